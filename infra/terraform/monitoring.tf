resource "azurerm_log_analytics_workspace" "main" {
  name                = "log-${local.name}"
  resource_group_name = var.resource_group_name
  location            = var.location
  sku                 = "PerGB2018"
  retention_in_days   = 30
  tags                = var.tags
}

# Workspace-based; local (instrumentation-key) auth off: telemetry is ingested
# with Entra ID (Monitoring Metrics Publisher for the identity, see roles.tf).
resource "azurerm_application_insights" "main" {
  name                         = "appi-${local.name}"
  resource_group_name          = var.resource_group_name
  location                     = var.location
  application_type             = "web"
  workspace_id                 = azurerm_log_analytics_workspace.main.id
  local_authentication_enabled = false
  tags                         = var.tags
}

# Blob and queue service logs and transaction metrics of the data account.
resource "azurerm_monitor_diagnostic_setting" "data" {
  for_each = {
    blob  = "blobServices"
    queue = "queueServices"
  }

  name                       = "diag-${each.key}"
  target_resource_id         = "${azurerm_storage_account.data.id}/${each.value}/default"
  log_analytics_workspace_id = azurerm_log_analytics_workspace.main.id

  enabled_log {
    category = "StorageRead"
  }

  enabled_log {
    category = "StorageWrite"
  }

  enabled_log {
    category = "StorageDelete"
  }

  enabled_metric {
    category = "Transaction"
  }
}
