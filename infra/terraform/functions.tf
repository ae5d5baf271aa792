resource "azurerm_service_plan" "main" {
  #checkov:skip=CKV_AZURE_212:FC1 Flex Consumption is serverless: the platform scales instances from zero (maximum_instance_count on the app); worker_count does not apply
  #checkov:skip=CKV_AZURE_225:FC1 Flex Consumption plan: zone_balancing_enabled is an App Service plan (Premium/Dedicated) setting that does not apply to this serverless SKU
  name                = "plan-${local.name}"
  resource_group_name = var.resource_group_name
  location            = var.location
  os_type             = "Linux"
  sku_name            = "FC1"
  tags                = var.tags
}

resource "azurerm_function_app_flex_consumption" "main" {
  name                = "func-${local.name}"
  resource_group_name = var.resource_group_name
  location            = var.location
  service_plan_id     = azurerm_service_plan.main.id

  runtime_name           = "python"
  runtime_version        = "3.11"
  maximum_instance_count = 40
  instance_memory_in_mb  = 2048

  # Deployment package: the "deployments" container of the data account, read
  # with the user-assigned identity.
  storage_container_type            = "blobContainer"
  storage_container_endpoint        = "${azurerm_storage_account.data.primary_blob_endpoint}${azurerm_storage_container.data["deployments"].name}"
  storage_authentication_type       = "UserAssignedIdentity"
  storage_user_assigned_identity_id = azurerm_user_assigned_identity.main.id

  https_only                      = true
  key_vault_reference_identity_id = azurerm_user_assigned_identity.main.id

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.main.id]
  }

  # infra/app-settings.json plus the deployment-specific, identity-based settings.
  # No keys and no connection strings with keys.
  app_settings = merge(local.shared_settings, {
    AzureWebJobsStorage__accountName          = azurerm_storage_account.data.name
    AzureWebJobsStorage__credential           = "managedidentity"
    AzureWebJobsStorage__clientId             = azurerm_user_assigned_identity.main.client_id
    AzureWebJobsFeatureFlags                  = "EnableWorkerIndexing"
    AZURE_CLIENT_ID                           = azurerm_user_assigned_identity.main.client_id
    CLUSTERLENS_AZURE_STORAGE_ACCOUNT_URL     = local.storage_account_url
    APPLICATIONINSIGHTS_CONNECTION_STRING     = azurerm_application_insights.main.connection_string
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING = local.app_insights_authentication_string
  })

  site_config {
    minimum_tls_version = "1.2"
    http2_enabled       = true
  }

  # The models share at /mounts/models (CLUSTERLENS_MODEL_DIR). The account key
  # goes only to this mount configuration.
  storage_account {
    name         = "models"
    type         = "AzureFiles"
    account_name = azurerm_storage_account.files.name
    share_name   = azurerm_storage_share.models.name
    access_key   = azurerm_storage_account.files.primary_access_key
    mount_path   = "/mounts/models"
  }

  tags = var.tags

  depends_on = [azurerm_role_assignment.identity]
}

data "azurerm_function_app_host_keys" "main" {
  name                = azurerm_function_app_flex_consumption.main.name
  resource_group_name = var.resource_group_name
}
