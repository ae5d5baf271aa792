locals {
  role_assignments = {
    "Storage Blob Data Owner" = {
      scope                = azurerm_storage_account.data.id
      role_definition_name = "Storage Blob Data Owner" # b7e6dc6d-f1e8-4753-8033-0f276bb0955b
    }
    "Storage Queue Data Contributor" = {
      scope                = azurerm_storage_account.data.id
      role_definition_name = "Storage Queue Data Contributor" # 974c5e8b-45b9-4653-ba55-5f855dd0fb88
    }
    "AcrPull" = {
      scope                = azurerm_container_registry.main.id
      role_definition_name = "AcrPull" # 7f951dff-4718-4b4c-9c0f-d35bf9ccbe74
    }
    "Monitoring Metrics Publisher" = {
      scope                = azurerm_application_insights.main.id
      role_definition_name = "Monitoring Metrics Publisher" # 3913510d-42f4-4e42-8a64-420c390055eb
    }
  }
}

# Name: a deterministic GUID of (scope, identity, role), as Bicep's guid().
resource "azurerm_role_assignment" "identity" {
  for_each = local.role_assignments

  name                 = uuidv5("url", "${each.value.scope}/${azurerm_user_assigned_identity.main.principal_id}/${each.value.role_definition_name}")
  scope                = each.value.scope
  role_definition_name = each.value.role_definition_name
  principal_id         = azurerm_user_assigned_identity.main.principal_id
  principal_type       = "ServicePrincipal"
}

# The deploying principal's data roles (shared keys are off on the data account, so
# `az storage ... --auth-mode login` needs them): upload a test image and read the queues
# (docs/deploy.md "Check it"). The models go onto the share with the files account's key.
# Terraform itself needs neither (versions.tf: data_plane_available = false).
data "azurerm_client_config" "current" {}

locals {
  deployer_roles = var.grant_deployer_data_roles ? {
    "Storage Blob Data Contributor" = {
      scope                = azurerm_storage_account.data.id
      role_definition_name = "Storage Blob Data Contributor" # ba92f5b4-2d11-453d-a403-e96b0029c9fe
    }
    "Storage Queue Data Contributor" = {
      scope                = azurerm_storage_account.data.id
      role_definition_name = "Storage Queue Data Contributor" # 974c5e8b-45b9-4653-ba55-5f855dd0fb88
    }
  } : {}
}

resource "azurerm_role_assignment" "deployer" {
  for_each = local.deployer_roles

  name                 = uuidv5("url", "${each.value.scope}/${data.azurerm_client_config.current.object_id}/${each.value.role_definition_name}")
  scope                = each.value.scope
  role_definition_name = each.value.role_definition_name
  principal_id         = data.azurerm_client_config.current.object_id
}
