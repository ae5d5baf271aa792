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
    "Storage File Data Privileged Reader" = {
      scope                = azurerm_storage_account.files.id
      role_definition_name = "Storage File Data Privileged Reader" # b8eda974-7b85-4f76-af95-65846b26df6d
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
