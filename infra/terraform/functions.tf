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

  https_only = true

  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.main.id]
  }

  # infra/app-settings.json plus the deployment-specific, identity-based settings.
  # No keys and no connection strings with keys.
  app_settings = merge(local.shared_settings, {
    # Empty on purpose: with storage_authentication_type = "UserAssignedIdentity" the provider
    # still writes an AzureWebJobsStorage connection string with an empty AccountKey, which wins
    # over the AzureWebJobsStorage__* identity settings below; with shared keys off the host then
    # cannot reach its storage (no keys, no timers, no blob trigger): hashicorp/terraform-provider-azurerm#29693.
    AzureWebJobsStorage                       = ""
    AzureWebJobsStorage__accountName          = azurerm_storage_account.data.name
    AzureWebJobsStorage__credential           = "managedidentity"
    AzureWebJobsStorage__clientId             = azurerm_user_assigned_identity.main.client_id
    AzureWebJobsFeatureFlags                  = "EnableWorkerIndexing"
    AZURE_CLIENT_ID                           = azurerm_user_assigned_identity.main.client_id
    CLUSTERLENS_AZURE_STORAGE_ACCOUNT_URL     = local.storage_account_url
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING = local.app_insights_authentication_string
  })

  site_config {
    minimum_tls_version = "1.2"
    http2_enabled       = true
    # Here, not in app_settings: the provider moves it into APPLICATIONINSIGHTS_CONNECTION_STRING
    # itself, and a copy in app_settings shows as a change in every plan.
    application_insights_connection_string = azurerm_application_insights.main.connection_string
  }

  tags = var.tags

  depends_on = [azurerm_role_assignment.identity]
}

# The Key Vault reference identity (for CLUSTERLENS_API_KEY as a Key Vault reference, docs/deploy.md):
# azurerm_function_app_flex_consumption has no argument for it, so it is PATCHed onto the site.
resource "azapi_resource_action" "key_vault_reference_identity" {
  type        = "Microsoft.Web/sites@2024-04-01"
  resource_id = azurerm_function_app_flex_consumption.main.id
  method      = "PATCH"
  body = {
    properties = {
      keyVaultReferenceIdentity = azurerm_user_assigned_identity.main.id
    }
  }
}

# The two shares, as azapi's own example for sites/config azurestorageaccounts does it (a PUT:
# this config has no GET, and the PUT replaces the whole set, so both mounts go in this one
# request): models at /mounts/models (CLUSTERLENS_MODEL_DIR) and index at /mounts/index
# (CLUSTERLENS_INDEX_MOUNT: published index versions, opened in place instead of downloaded).
# App Service storage mounts have no read-only flag for Azure Files (only Azure Blob mounts are
# read-only, and they need a key on the data account, whose keys are off); the app only reads
# both shares. Azure Files mounts authenticate with the files account key, which is passed
# write-only (not kept in state).
data "azapi_resource_id" "storage_mounts" {
  type      = "Microsoft.Web/sites/config@2024-04-01"
  parent_id = azurerm_function_app_flex_consumption.main.id
  name      = "azurestorageaccounts"
}

resource "azapi_resource_action" "share_mounts" {
  type        = "Microsoft.Web/sites/config@2024-04-01"
  resource_id = data.azapi_resource_id.storage_mounts.id
  method      = "PUT"
  body = {
    properties = {
      models = {
        type        = "AzureFiles"
        accountName = azurerm_storage_account.files.name
        shareName   = azurerm_storage_share.models.name
        mountPath   = "/mounts/models"
        protocol    = "Smb"
      }
      index = {
        type        = "AzureFiles"
        accountName = azurerm_storage_account.files.name
        shareName   = azurerm_storage_share.index.name
        mountPath   = "/mounts/index"
        protocol    = "Smb"
      }
    }
  }
  sensitive_body = {
    properties = {
      models = {
        accessKey = azurerm_storage_account.files.primary_access_key
      }
      index = {
        accessKey = azurerm_storage_account.files.primary_access_key
      }
    }
  }
  # Bump to send a rotated key.
  sensitive_body_version = {
    "properties.models.accessKey" = "1"
    "properties.index.accessKey"  = "1"
  }
}
