"""Regenerate tests/data/terraform_provider_args.json: the argument names (and nested blocks) of every
resource and data source type infra/terraform uses, read from the provider docs at the pinned tags.

`terraform validate` needs provider downloads, which this project's checks cannot make; instead
tests/test_terraform_args.py holds every argument of infra/terraform/*.tf against this file. When a
provider pin in infra/terraform/versions.tf moves, or the .tf files use a new resource type, rerun:

    .venv/bin/python scripts/vendor_provider_args.py \\
        --azurerm-mirror <git dir of hashicorp/terraform-provider-azurerm> --azurerm-tag v4.81.0 \\
        --azapi-mirror <git dir of Azure/terraform-provider-azapi> --azapi-tag v2.12.0 \\
        --random-mirror <git dir of hashicorp/terraform-provider-random> --random-tag v3.6.0 \\
        --null-mirror <git dir of hashicorp/terraform-provider-null> --null-tag v3.2.0

Each mirror is a git clone (bare is fine: files are read with `git show <tag>:<path>`). Vendor the
lowest version the versions.tf constraint admits (the test checks the pin against it), so that every
argument accepted here exists in every version Terraform may install.

Doc formats:
- azurerm (website/docs/{r,d}/<name>.html.markdown): "## Arguments Reference" holds bullets
  "* `arg` - (Required|Optional) ..." for the top level, then sections headed "A `x` block supports the
  following:" whose bullets are the arguments of block x; a bullet whose text says "block" (or one under
  "supports the following nested blocks") links a nested block to its parent, which gives full paths
  (event_trigger_config.scale.rules.authentication). "## Timeouts" gives the timeouts block.
- azapi, random, null (tfplugindocs, docs/{resources,data-sources}/<name>.md): "### Required" and
  "### Optional" bullets "- `arg` (Type) ..." ("Read-Only" is skipped), then "### Nested Schema for
  `a.b`" with "Required:" / "Optional:" lists; a "(Block ...)" type marks a nested block.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TERRAFORM = ROOT / "infra" / "terraform"
DEFAULT_OUT = ROOT / "tests" / "data" / "terraform_provider_args.json"

# Types vendored whether or not infra/terraform uses them today (the lead's planned rewrite, and
# their neighbours), as fnmatch patterns over the doc names. Names starting "data." are data sources.
EXTRA_TYPES = [
    "azapi_resource",
    "azapi_update_resource",
    "azapi_resource_action",
    "data.azapi_resource",
    "data.azurerm_function_app_host_keys",
    "data.azurerm_client_config",
    "azurerm_role_assignment",
    "azurerm_container_app",
    "azurerm_container_app_job",
    "azurerm_container_app_environment",
    "azurerm_container_app_environment_storage",
    "azurerm_storage_*",
    "azurerm_eventgrid_*",
    "azurerm_monitor_diagnostic_setting",
    "azurerm_application_insights",
    "azurerm_log_analytics_workspace",
    "azurerm_user_assigned_identity",
    "azurerm_service_plan",
    "azurerm_container_registry",
    "azurerm_function_app_flex_consumption",
    "random_string",
    "null_resource",
    "terraform_data",
]

# Built into Terraform (no provider, no doc in a mirror): terraform_data's arguments. `output` is a
# read-only attribute and so is not an argument.
TERRAFORM_DATA_DOC = "https://developer.hashicorp.com/terraform/language/resources/terraform-data"
BUILTIN: dict[str, dict[str, Any]] = {
    "terraform_data": {"arguments": ["input", "triggers_replace"], "blocks": {}},
}

# Meta-arguments every resource / data block takes (Terraform language, not a provider).
META_DOC = "https://developer.hashicorp.com/terraform/language/meta-arguments"
META: dict[str, Any] = {
    "resource": ["count", "for_each", "provider", "depends_on", "lifecycle", "connection", "provisioner"],
    "data": ["count", "for_each", "provider", "depends_on", "lifecycle"],
    "blocks": {
        "lifecycle": [
            "create_before_destroy",
            "prevent_destroy",
            "ignore_changes",
            "replace_triggered_by",
            "precondition",
            "postcondition",
        ],
        "lifecycle.precondition": ["condition", "error_message"],
        "lifecycle.postcondition": ["condition", "error_message"],
    },
    # Their contents depend on the connection type / provisioner: not checked.
    "opaque_blocks": ["connection", "provisioner"],
}

PROVIDERS = {
    "azurerm": ("hashicorp/azurerm", "https://github.com/hashicorp/terraform-provider-azurerm"),
    "azapi": ("azure/azapi", "https://github.com/Azure/terraform-provider-azapi"),
    "random": ("hashicorp/random", "https://github.com/hashicorp/terraform-provider-random"),
    "null": ("hashicorp/null", "https://github.com/hashicorp/terraform-provider-null"),
}


@dataclass
class Schema:
    """Argument names of one type: the top level, and each nested block by its dotted path."""

    arguments: set[str] = field(default_factory=set)
    blocks: dict[str, set[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "arguments": sorted(self.arguments),
            "blocks": {path: sorted(args) for path, args in sorted(self.blocks.items())},
        }


# --- git ----------------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=120
    ).stdout


def show(repo: Path, tag: str, path: str) -> str:
    return git(repo, "show", f"{tag}:{path}")


def ls(repo: Path, tag: str, folder: str) -> list[str]:
    """File names in folder at tag (none when the folder is absent: random has no data sources)."""
    listing = git(repo, "ls-tree", "--name-only", tag, f"{folder}/")
    return [line.rsplit("/", 1)[-1] for line in listing.split()]


# --- azurerm docs -------------------------------------------------------------------------------

BULLET = re.compile(r"^[*-]\s+`([^`\s]+)`(.*)$")
IDENTIFIER = re.compile(r"^[a-z0-9_]+$")
HEADING = re.compile(r"^(?:A|An|The)\s+`([A-Za-z0-9_]+)`\s+(?:block\s+)?supports\b(.*)$")
MENTIONS_BLOCK = re.compile(r"\bblocks?\b")


@dataclass
class _Section:
    name: str  # "" for the top level
    args: dict[str, bool] = field(default_factory=dict)  # name -> is a nested block
    template: set[str] | None = None  # "Each nested block consists of": the args of every child
    children_are_blocks: bool = False


def _section(text: str, title: str) -> list[str]:
    """The lines of the "## <title>" section of a markdown doc (empty when it has none)."""
    out: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line[3:].strip().lower() == title.lower()
            continue
        if inside:
            out.append(line.rstrip())
    return out


def _ascii(name: str) -> str:
    """A name with its accents dropped: the container_app doc spells one bullet `ìdentity_id`."""
    return unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()


def parse_azurerm(text: str) -> Schema:
    lines = _section(text, "Arguments Reference") or _section(text, "Argument Reference")
    sections = [_Section("")]
    for line in lines:
        heading = HEADING.match(line)
        if heading:
            sections.append(_Section(heading.group(1)))
            # "A `advanced_filter` supports the following nested blocks:": each bullet is a block.
            sections[-1].children_are_blocks = "nested blocks" in heading.group(2)
            continue
        current = sections[-1]
        if line.startswith("Each nested block consists of"):
            current.template = set()
            continue
        bullet = BULLET.match(line)
        if not bullet:
            continue
        name, rest = bullet.groups()
        name = _ascii(name)
        if not IDENTIFIER.match(name):
            continue
        if current.template is not None:
            current.template.add(name)
        elif current.children_are_blocks:
            current.args[name] = True
        else:
            current.args[name] = bool(MENTIONS_BLOCK.search(rest))

    schema = Schema()
    by_name: dict[str, list[_Section]] = {}
    for sec in sections[1:]:
        by_name.setdefault(sec.name, []).append(sec)
    top = sections[0]
    schema.arguments = set(top.args)
    reached: set[str] = set()

    def block_args(name: str) -> tuple[set[str], dict[str, bool], set[str] | None] | None:
        secs = by_name.get(name)
        if not secs:
            return None
        args: dict[str, bool] = {}
        template: set[str] | None = None
        for sec in secs:  # the same heading twice (e.g. `header` under each probe): the union
            for arg, is_block in sec.args.items():
                args[arg] = args.get(arg, False) or is_block
            if sec.template is not None:
                template = (template or set()) | sec.template
        return set(args), args, template

    def walk(path: str, args: dict[str, bool], template: set[str] | None, depth: int) -> None:
        for arg, is_block in sorted(args.items()):
            child = f"{path}.{arg}" if path else arg
            if template is not None:
                schema.blocks[child] = set(template)
                continue
            if not is_block:
                continue
            found = block_args(arg)
            if found is None:
                # Its text says "block" but no "A `x` block supports" section follows: an argument.
                schema.warnings.append(f"{child} mentions a block but has no section; kept as an argument")
                continue
            reached.add(arg)
            names, sub, sub_template = found
            schema.blocks[child] = names
            if depth < 12:
                walk(child, sub, sub_template, depth + 1)

    walk("", top.args, None, 0)
    for name in by_name:
        if name not in reached:
            # A section no bullet links as a block: keep it under its bare name, which the test
            # finds by the last element of a block's path.
            found = block_args(name)
            assert found is not None
            schema.blocks.setdefault(name, found[0])
            schema.warnings.append(f"section `{name}` is linked from no block bullet; kept as `{name}`")

    timeouts = {_ascii(m.group(1)) for m in map(BULLET.match, _section(text, "Timeouts")) if m}
    if timeouts:
        schema.arguments.add("timeouts")
        schema.blocks["timeouts"] = timeouts
    return schema


# --- tfplugindocs (azapi, random, null) ---------------------------------------------------------

PLUGIN_BULLET = re.compile(r"^- `([A-Za-z0-9_]+)` \(([^)]*)\)")
NESTED = re.compile(r"^### Nested Schema for `([A-Za-z0-9_.]+)`")


def parse_plugindocs(text: str) -> Schema:
    schema = Schema()
    scope: str | None = None  # None: before "## Schema"; "": the top level; else a block path
    kind = ""  # "required" / "optional" / "read-only"
    block_paths: set[str] = set()
    lists: dict[str, set[str]] = {"": set()}
    for line in text.splitlines():
        if line.startswith("## "):
            scope = "" if line.strip() == "## Schema" else None
            continue
        if scope is None:
            continue
        nested = NESTED.match(line)
        if nested:
            scope = nested.group(1)
            lists.setdefault(scope, set())
            kind = ""
            continue
        head = line.strip().lower().lstrip("#").strip().rstrip(":")
        if head in ("required", "optional", "read-only"):
            kind = head
            continue
        bullet = PLUGIN_BULLET.match(line)
        if bullet and kind in ("required", "optional"):
            name, type_ = bullet.groups()
            lists[scope].add(name)
            if "Block" in type_:
                block_paths.add(f"{scope}.{name}" if scope else name)
    schema.arguments = lists[""]
    for path in sorted(block_paths):
        schema.blocks[path] = lists.get(path, set())
        if path not in lists:
            schema.warnings.append(f"block {path} has no 'Nested Schema' section")
    return schema


# --- what infra/terraform uses ------------------------------------------------------------------


def _unquote(label: str) -> str:
    return label[1:-1] if len(label) >= 2 and label[0] == label[-1] == '"' else label


def used_types(terraform_dir: Path) -> set[str]:
    """Resource types and "data."-prefixed data source types of every .tf file in terraform_dir."""
    types: set[str] = set()
    for path in sorted(terraform_dir.glob("*.tf")):
        parsed = hcl2.loads(path.read_text())
        for kind in ("resource", "data"):
            for entry in parsed.get(kind, []):
                for rtype in entry:
                    name = _unquote(rtype)
                    types.add(name if kind == "resource" else f"data.{name}")
    return types


# --- assembly -----------------------------------------------------------------------------------


@dataclass
class Mirror:
    provider: str
    repo: Path
    tag: str

    def header(self) -> dict[str, Any]:
        source, url = PROVIDERS[self.provider]
        commit = git(self.repo, "rev-parse", f"{self.tag}^{{commit}}").strip()
        return {
            "source": source,
            "repository": url,
            "tag": self.tag,
            "version": self.tag.removeprefix("v"),
            "commit": commit,
            "commit_date": git(self.repo, "log", "-1", "--format=%cs", commit).strip(),
        }

    def docs(self, data: bool) -> dict[str, str]:
        """Type name -> doc path inside the repository."""
        prefix = f"{self.provider}_"
        if self.provider == "azurerm":
            folder = "website/docs/d" if data else "website/docs/r"
            suffix = ".html.markdown"
        else:
            folder = "docs/data-sources" if data else "docs/resources"
            suffix = ".md"
        out: dict[str, str] = {}
        for name in ls(self.repo, self.tag, folder):
            if not name.endswith(suffix):
                continue
            stem = name.removesuffix(suffix)
            if self.provider != "azurerm" and stem[:1].isupper():  # azapi's per-ARM-type guides
                continue
            out[stem if stem.startswith(prefix) else prefix + stem] = f"{folder}/{name}"
        return out


def provider_of(rtype: str) -> str:
    return "terraform" if rtype == "terraform_data" else rtype.split("_", 1)[0]


def build(mirrors: list[Mirror], terraform_dir: Path, date: str) -> tuple[dict[str, Any], list[str]]:
    wanted = used_types(terraform_dir)
    warnings: list[str] = []
    providers: dict[str, Any] = {m.provider: m.header() for m in mirrors}
    providers["terraform"] = {"source": "builtin", "doc": TERRAFORM_DATA_DOC}
    out: dict[str, Any] = {
        "_about": (
            "Argument names of the provider types infra/terraform uses, from the provider docs at the tags "
            "below; tests/test_terraform_args.py holds the .tf files against it. Regenerate with "
            "scripts/vendor_provider_args.py (see its docstring)."
        ),
        "generated": date,
        "generator": "scripts/vendor_provider_args.py",
        "providers": providers,
        "meta_arguments": {"doc": META_DOC, **META},
        "resource": {},
        "data": {},
    }
    by_provider = {m.provider: m for m in mirrors}
    catalogue: dict[str, str] = {}  # "data.x" / "x" -> doc path
    for m in mirrors:
        for is_data in (False, True):
            for rtype, path in m.docs(is_data).items():
                catalogue[f"data.{rtype}" if is_data else rtype] = path
    names = set(wanted)
    for pattern in EXTRA_TYPES:
        matches = [n for n in catalogue if fnmatch.fnmatchcase(n, pattern)]
        names.update(matches or [pattern])
    for name in sorted(names):
        data = name.startswith("data.")
        rtype = name.removeprefix("data.")
        section = out["data" if data else "resource"]
        provider = provider_of(rtype)
        if rtype in BUILTIN and not data:
            section[rtype] = {"provider": "terraform", "doc": TERRAFORM_DATA_DOC, **BUILTIN[rtype]}
            continue
        mirror = by_provider.get(provider)
        doc = catalogue.get(name)
        if mirror is None or doc is None:
            raise SystemExit(f"no doc for {name} (provider {provider}): is its mirror given and the name right?")
        text = show(mirror.repo, mirror.tag, doc)
        schema = parse_azurerm(text) if provider == "azurerm" else parse_plugindocs(text)
        if not schema.arguments and "no arguments" not in text.lower():
            raise SystemExit(f"{doc}: no arguments parsed")
        warnings.extend(f"{name}: {w}" for w in schema.warnings)
        section[rtype] = {"provider": provider, "doc": doc, **schema.as_json()}
    return out, warnings


def dump(value: Any, indent: int = 0) -> str:
    """JSON with one line per type or block: a list of names stays on its line."""
    if isinstance(value, dict) and value:
        pad = " " * (indent + 1)
        items = [f"{pad}{json.dumps(k)}: {dump(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return json.dumps(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for provider in PROVIDERS:
        parser.add_argument(f"--{provider}-mirror", type=Path, required=provider != "null")
        parser.add_argument(f"--{provider}-tag", required=provider != "null")
    parser.add_argument("--terraform-dir", type=Path, default=DEFAULT_TERRAFORM)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--date", default=dt.date.today().isoformat(), help="the 'generated' date written")
    args = parser.parse_args(argv)
    mirrors = []
    for provider in PROVIDERS:
        repo, tag = getattr(args, f"{provider}_mirror"), getattr(args, f"{provider}_tag")
        if repo is not None and tag is not None:
            mirrors.append(Mirror(provider, repo, tag))
    data, warnings = build(mirrors, args.terraform_dir, args.date)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(data) + "\n")
    counts = {kind: len(data[kind]) for kind in ("resource", "data")}
    print(f"wrote {args.out}: {counts['resource']} resource types, {counts['data']} data sources")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
