"""Every argument and nested block of infra/terraform/*.tf is one the pinned provider documents.

`terraform validate` would catch an argument a resource type does not have, but it needs the providers
downloaded, which this suite cannot do. tests/data/terraform_provider_args.json holds the argument names
of each resource and data source type, read from the provider docs at the pinned tags by
scripts/vendor_provider_args.py; this test walks every resource and data block of the .tf files
(attributes, nested blocks, `dynamic "x" { content {...} }` as block x, meta-arguments) against it, and
holds versions.tf's provider pins to the vendored versions: each admits the vendored version, no version
below it (an argument documented at the vendored version might not exist in an older one) and not the
next major.

Documented means listed in the docs at the vendored tag. The azurerm 4.x docs no longer list arguments
deprecated for removal in 5.0 (application_insights' local_authentication_disabled, say) although the
4.x schema still takes them: the test reports those too, and the fix is their documented replacement.
When it reports an argument the Go schema (internal/services/.../*_resource.go) does take and the docs
omit, fix the parse in scripts/vendor_provider_args.py, or use a documented argument.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import pytest

ROOT = Path(__file__).resolve().parent.parent
TERRAFORM = ROOT / "infra" / "terraform"
VENDORED = ROOT / "tests" / "data" / "terraform_provider_args.json"
REGENERATE = (
    "regenerate tests/data/terraform_provider_args.json with scripts/vendor_provider_args.py "
    "(its docstring gives the command; add the type to EXTRA_TYPES there if the .tf files do not use it yet)"
)
# Pinned in versions.tf whether or not a type of theirs is used (the plan: azapi for what azurerm lacks).
REQUIRED_PROVIDERS = ("azurerm", "azapi", "random")
# The arguments of a `dynamic` block itself, around its `content` block.
DYNAMIC_ARGS = {"for_each", "iterator", "labels", "content"}


@cache
def vendored() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VENDORED.read_text())
    return data


def _unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _blocks(value: Any) -> list[dict[str, Any]] | None:
    """The bodies of a nested block as python-hcl2 gives them, or None when the value is an attribute."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and v.get("__is_block__") for v in value):
        return value
    return None


def _fields(body: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in body.items() if not k.startswith("__")]


class _Walker:
    """Checks one resource or data block against its vendored schema."""

    def __init__(self, where: str, schema: dict[str, Any], kind: str, data: dict[str, Any]) -> None:
        self.where = where
        self.schema = schema
        self.kind = kind
        self.meta = data["meta_arguments"]
        provider = data["providers"].get(schema["provider"], {})
        self.against = f"{schema['doc']} @ {schema['provider']} {provider.get('tag', 'builtin')}"
        self.findings: list[str] = []

    def report(self, path: str, what: str = "") -> None:
        self.findings.append(f"{self.where}: {path}{what} (not in {self.against})")

    def allowed(self, path: str) -> set[str] | None:
        """The argument names of the block at path ("" = the top level); None when the doc lists none."""
        if not path:
            return set(self.schema["arguments"])
        blocks: dict[str, list[str]] = self.schema["blocks"]
        if path in blocks:
            return set(blocks[path])
        # A block the doc's sections do not place under this parent: match it by its own name.
        last = path.rsplit(".", 1)[-1]
        found = [set(args) for p, args in blocks.items() if p == last or p.endswith(f".{last}")]
        return set().union(*found) if found else None

    def walk_top(self, body: dict[str, Any]) -> None:
        meta_blocks: dict[str, list[str]] = self.meta["blocks"]
        for key, value in _fields(body):
            if key in self.meta[self.kind]:
                if key in self.meta["opaque_blocks"]:
                    continue
                if key == "lifecycle":
                    for block in _blocks(value) or []:
                        self._walk_meta("lifecycle", block, meta_blocks)
                continue
            self._field("", key, value)

    def _walk_meta(self, path: str, body: dict[str, Any], meta_blocks: dict[str, list[str]]) -> None:
        for key, value in _fields(body):
            child = f"{path}.{key}"
            if key not in meta_blocks[path]:
                self.findings.append(f"{self.where}: {child} (not a Terraform {path} argument: {self.meta['doc']})")
            elif child in meta_blocks:
                for block in _blocks(value) or []:
                    self._walk_meta(child, block, meta_blocks)

    def walk(self, path: str, body: dict[str, Any]) -> None:
        for key, value in _fields(body):
            self._field(path, key, value)

    def _field(self, path: str, key: str, value: Any) -> None:
        if key == "dynamic":
            for entry in value:
                for label, dyn in entry.items():
                    name = _unquote(label)
                    for arg, _ in _fields(dyn):
                        if arg not in DYNAMIC_ARGS:
                            self.findings.append(
                                f"{self.where}: dynamic {name!r}: {arg} (not a dynamic block argument)"
                            )
                    self._block(path, name, _blocks(dyn.get("content")) or [{}], dynamic=True)
            return
        blocks = _blocks(value)
        if blocks is None:
            child = f"{path}.{key}" if path else key
            allowed = self.allowed(path)
            if allowed is not None and key not in allowed:
                self.report(child)
            return
        self._block(path, key, blocks)

    def _block(self, path: str, key: str, bodies: list[dict[str, Any]], dynamic: bool = False) -> None:
        child = f"{path}.{key}" if path else key
        allowed = self.allowed(path)
        if allowed is not None and key not in allowed:
            self.report(child, " {} (dynamic block)" if dynamic else " {} (block)")
            return
        if self.allowed(child) is None:
            self.report(child, " {} (a block the doc gives no arguments for: an argument, not a block?)")
            return
        for body in bodies:
            self.walk(child, body)


def check_arguments(directory: Path) -> list[str]:
    """Every argument of the resource and data blocks of directory/*.tf the vendored docs do not list,
    as "file: type.name: path.arg (not in doc @ provider tag)"."""
    data = vendored()
    findings: list[str] = []
    files = sorted(directory.glob("*.tf"))
    assert files, f"{directory} has no .tf files"
    for path in files:
        parsed = hcl2.loads(path.read_text())
        for kind in ("resource", "data"):
            for entry in parsed.get(kind, []):
                for rtype_label, named in entry.items():
                    rtype = _unquote(rtype_label)
                    for name_label, body in named.items():
                        address = f"{'data.' if kind == 'data' else ''}{rtype}.{_unquote(name_label)}"
                        where = f"{path.name}: {address}"
                        schema = data[kind].get(rtype)
                        if schema is None:
                            findings.append(f"{where}: {kind} type {rtype} is not vendored; {REGENERATE}")
                            continue
                        walker = _Walker(where, schema, kind, data)
                        walker.walk_top(body)
                        findings.extend(walker.findings)
    return findings


# --- versions.tf ---------------------------------------------------------------------------------

Version = tuple[int, int, int]
_CONSTRAINT = re.compile(r"^\s*(=|!=|>=|<=|>|<|~>)?\s*v?(\d+(?:\.\d+){0,2})\s*$")


def parse_version(text: str) -> Version:
    parts = [int(p) for p in text.removeprefix("v").split(".")]
    return (parts + [0, 0, 0])[0], (parts + [0, 0])[1], (parts + [0, 0, 0])[2]


def _terms(constraint: str) -> list[tuple[str, Version, int]]:
    """(operator, version, how many parts were written) of each comma-separated term."""
    terms = []
    for term in constraint.split(","):
        match = _CONSTRAINT.match(term)
        if not match:
            raise ValueError(f"unsupported version constraint term {term!r} in {constraint!r}")
        op, text = match.groups()
        terms.append((op or "=", parse_version(text), text.count(".") + 1))
    return terms


def admits(constraint: str, version: Version) -> bool:
    """Whether a Terraform version constraint admits version (no pre-releases)."""
    for op, bound, written in _terms(constraint):
        if op == "~>":
            # Only the rightmost written part may grow: ~> 4.81 admits >= 4.81.0, < 5.0.0; ~> 4.81.0
            # admits >= 4.81.0, < 4.82.0; ~> 4 admits >= 4.0.0 with no ceiling.
            ok = version >= bound
            if written >= 2:
                upper = list(bound[: written - 1])
                upper[-1] += 1
                ok = ok and version < tuple(upper + [0] * (3 - len(upper)))
        else:
            ok = {
                "=": version == bound,
                "!=": version != bound,
                ">": version > bound,
                ">=": version >= bound,
                "<": version < bound,
                "<=": version <= bound,
            }[op]
        if not ok:
            return False
    return True


def lower_bound(constraint: str) -> Version | None:
    """The least version the constraint's lower-bounding terms allow (None: no lower bound)."""
    bounds = [bound for op, bound, _ in _terms(constraint) if op in ("=", ">", ">=", "~>")]
    return max(bounds) if bounds else None


def required_providers(directory: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for path in sorted(directory.glob("*.tf")):
        for terraform in hcl2.loads(path.read_text()).get("terraform", []):
            for block in terraform.get("required_providers", []):
                for name, spec in _fields(block):
                    if isinstance(spec, dict):
                        out[name] = {k: str(_unquote(v)) for k, v in spec.items()}
    return out


def check_versions(directory: Path) -> list[str]:
    """How the provider pins of directory/*.tf disagree with the vendored versions."""
    data = vendored()
    findings: list[str] = []
    pins = required_providers(directory)
    used: set[str] = set()
    for path in sorted(directory.glob("*.tf")):
        parsed = hcl2.loads(path.read_text())
        for kind in ("resource", "data"):
            for entry in parsed.get(kind, []):
                for rtype in entry:
                    schema = data[kind].get(_unquote(rtype))
                    if schema is not None:
                        used.add(schema["provider"])
    for provider in sorted((set(REQUIRED_PROVIDERS) | used) - {"terraform"}):
        info = data["providers"][provider]
        vendored_version = parse_version(info["version"])
        next_major = (vendored_version[0] + 1, 0, 0)
        pin = pins.get(provider)
        label = f"{provider} (vendored {info['tag']})"
        if pin is None:
            findings.append(f"{label}: not in required_providers")
            continue
        if pin.get("source", "").lower() != info["source"].lower():
            findings.append(f"{label}: source {pin.get('source')!r}, vendored {info['source']!r}")
        constraint = pin.get("version")
        if not constraint:
            findings.append(f"{label}: no version constraint")
            continue
        if not admits(constraint, vendored_version):
            findings.append(f"{label}: {constraint!r} does not admit {info['version']}")
        if admits(constraint, next_major):
            findings.append(f"{label}: {constraint!r} admits the next major {'.'.join(map(str, next_major))}")
        low = lower_bound(constraint)
        if low is None or low < vendored_version:
            findings.append(
                f"{label}: {constraint!r} admits versions below {info['version']}, whose arguments the vendored "
                "docs do not describe: raise the pin, or vendor the pin's lowest version with "
                "scripts/vendor_provider_args.py"
            )
    return findings


# --- the tree ------------------------------------------------------------------------------------


def test_vendored_file_names_its_sources() -> None:
    data = vendored()
    for name, info in data["providers"].items():
        if name == "terraform":
            continue
        assert re.fullmatch(r"[0-9a-f]{40}", info["commit"]), name
        assert info["tag"] == f"v{info['version']}", name
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", data["generated"])
    for kind in ("resource", "data"):
        for rtype, schema in data[kind].items():
            assert schema["doc"], rtype
            assert schema["provider"] in data["providers"], rtype


def test_infra_terraform_arguments_are_documented() -> None:
    findings = check_arguments(TERRAFORM)
    assert not findings, "arguments the pinned providers do not document:\n" + "\n".join(findings)


def test_versions_pin_the_vendored_providers() -> None:
    findings = check_versions(TERRAFORM)
    assert not findings, "versions.tf vs tests/data/terraform_provider_args.json:\n" + "\n".join(findings)


# --- the check itself ----------------------------------------------------------------------------

GOOD = """
resource "azurerm_function_app_flex_consumption" "main" {
  count                       = 1
  name                        = "f"
  resource_group_name         = "rg"
  location                    = "westeurope"
  service_plan_id             = "id"
  runtime_name                = "python"
  runtime_version             = "3.11"
  storage_container_type      = "blobContainer"
  storage_container_endpoint  = "https://x"
  storage_authentication_type = "UserAssignedIdentity"
  app_settings                = { A = "1" }

  site_config {
    minimum_tls_version = "1.2"
    cors {
      allowed_origins = ["*"]
    }
    dynamic "ip_restriction" {
      for_each = var.rules
      content {
        name       = ip_restriction.key
        ip_address = ip_restriction.value
        headers {
          x_forwarded_for = ["1.2.3.4/32"]
        }
      }
    }
  }

  identity {
    type = "SystemAssigned"
  }

  timeouts {
    create = "30m"
  }

  lifecycle {
    ignore_changes = [tags]
    precondition {
      condition     = true
      error_message = "never"
    }
  }

  provisioner "local-exec" {
    command = "true"
  }

  depends_on = [azurerm_service_plan.main]
}

resource "azurerm_container_app_job" "worker" {
  name                         = "j"
  resource_group_name          = "rg"
  location                     = "westeurope"
  container_app_environment_id = "id"
  replica_timeout_in_seconds   = 60

  event_trigger_config {
    scale {
      rules {
        name             = "q"
        custom_rule_type = "azure-queue"
        metadata         = { queueName = "jobs" }
        identity_id      = "id"
        authentication {
          secret_name       = "s"
          trigger_parameter = "p"
        }
      }
    }
  }

  template {
    container {
      name   = "w"
      image  = "i"
      cpu    = 1
      memory = "2Gi"
      dynamic "env" {
        for_each = { A = "1" }
        content {
          name  = env.key
          value = env.value
        }
      }
    }
  }
}

resource "azapi_update_resource" "kv_identity" {
  type        = "Microsoft.Web/sites@2024-04-01"
  resource_id = "id"
  body        = { properties = { keyVaultReferenceIdentity = "id" } }
  retry       = { error_message_regex = ["Conflict"] }
}

resource "terraform_data" "marker" {
  input = "x"
}

data "azurerm_client_config" "current" {}
"""

BAD = """
resource "azurerm_function_app_flex_consumption" "main" {
  name                            = "f"
  key_vault_reference_identity_id = "id"

  site_config {
    not_a_site_setting = true
  }

  storage_account {
    name = "models"
  }

  lifecycle {
    ignore_change = [tags]
  }
}

resource "azurerm_container_app_job" "worker" {
  template {
    container {
      dynamic "environment" {
        for_each = {}
        content {
          name = "x"
        }
      }
    }
  }
}

data "azurerm_function_app_host_keys" "main" {
  name     = "f"
  function = "g"
}
"""


def test_check_passes_documented_arguments(tmp_path: Path) -> None:
    (tmp_path / "main.tf").write_text(GOOD)
    assert check_arguments(tmp_path) == []


def test_check_reports_unknown_arguments_and_blocks(tmp_path: Path) -> None:
    (tmp_path / "functions.tf").write_text(BAD)
    findings = check_arguments(tmp_path)
    flex = "functions.tf: azurerm_function_app_flex_consumption.main: "
    expected = [
        flex + "key_vault_reference_identity_id (not in website/docs/r/function_app_flex_consumption",
        flex + "site_config.not_a_site_setting (not in",
        flex + "storage_account {} (block) (not in",
        flex + "lifecycle.ignore_change (not a Terraform lifecycle argument",
        "functions.tf: azurerm_container_app_job.worker: template.container.environment {} (dynamic block)",
        "functions.tf: data.azurerm_function_app_host_keys.main: function (not in website/docs/d/",
    ]
    for prefix in expected:
        assert [f for f in findings if f.startswith(prefix)], (prefix, findings)
    assert len(findings) == len(expected), findings
    assert all("@ azurerm v" in f for f in findings if "lifecycle" not in f), findings


def test_check_reports_a_type_that_is_not_vendored(tmp_path: Path) -> None:
    (tmp_path / "main.tf").write_text('resource "azurerm_key_vault" "kv" {\n  name = "kv"\n}\n')
    (finding,) = check_arguments(tmp_path)
    assert finding.startswith("main.tf: azurerm_key_vault.kv: resource type azurerm_key_vault is not vendored")
    assert "scripts/vendor_provider_args.py" in finding


def _versions(azurerm: str, azapi: str | None, random: str = "~> 3.6") -> str:
    entries = {"azurerm": ("hashicorp/azurerm", azurerm), "random": ("hashicorp/random", random)}
    if azapi is not None:
        entries["azapi"] = ("Azure/azapi", azapi)
    body = "\n".join(
        f'    {name} = {{\n      source  = "{source}"\n      version = "{version}"\n    }}'
        for name, (source, version) in entries.items()
    )
    return f"terraform {{\n  required_providers {{\n{body}\n  }}\n}}\n"


def _pin(provider: str, floor: bool = True) -> str:
    major, minor, _ = parse_version(vendored()["providers"][provider]["version"])
    return f"~> {major}.{minor}" if floor else f"~> {major}.0"


def test_versions_check_accepts_pins_of_the_vendored_versions(tmp_path: Path) -> None:
    (tmp_path / "versions.tf").write_text(_versions(_pin("azurerm"), _pin("azapi"), _pin("random")))
    assert check_versions(tmp_path) == []


def test_versions_check_reports_loose_or_missing_pins(tmp_path: Path) -> None:
    (tmp_path / "versions.tf").write_text(_versions(_pin("azurerm", floor=False), None, ">= 3.6"))
    findings = "\n".join(check_versions(tmp_path))
    assert "azapi (vendored" in findings and "not in required_providers" in findings
    assert "azurerm (vendored" in findings and "admits versions below" in findings
    assert "random (vendored" in findings and "admits the next major 4.0.0" in findings


@pytest.mark.parametrize(
    ("constraint", "version", "expected"),
    [
        ("~> 4.81", (4, 81, 0), True),
        ("~> 4.81", (4, 99, 3), True),
        ("~> 4.81", (5, 0, 0), False),
        ("~> 4.81", (4, 80, 9), False),
        ("~> 4.81.0", (4, 82, 0), False),
        ("~> 4.81.0", (4, 81, 7), True),
        ("~> 4", (4, 99, 0), True),
        ("~> 4", (5, 0, 0), True),
        (">= 4.81.0, < 5.0.0", (4, 81, 0), True),
        (">= 4.81.0, < 5.0.0", (5, 0, 0), False),
        ("4.81.0", (4, 81, 0), True),
        ("!= 4.81.0", (4, 81, 0), False),
    ],
)
def test_admits(constraint: str, version: Version, expected: bool) -> None:
    assert admits(constraint, version) is expected


def test_lower_bound() -> None:
    assert lower_bound("~> 4.81") == (4, 81, 0)
    assert lower_bound(">= 4.0, < 5.0") == (4, 0, 0)
    assert lower_bound("< 5.0") is None
