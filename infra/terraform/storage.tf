# Data account: blobs and queues, Entra ID only (no shared keys).
resource "azurerm_storage_account" "data" {
  #checkov:skip=CKV_AZURE_35:Network default Allow on purpose: Flex Consumption and Container Apps run without a VNet here; every request needs Entra ID + RBAC (shared keys off)
  #checkov:skip=CKV_AZURE_59:Public endpoint needed: the function app, the Container Apps job and Event Grid reach it without a VNet; shared keys are off and anonymous blob access is off
  #checkov:skip=CKV2_AZURE_33:No private endpoint: serverless VNet-less design (Flex Consumption without VNet integration, Container Apps environment without a VNet)
  #checkov:skip=CKV2_AZURE_1:Encrypted with Microsoft-managed keys; customer-managed keys need a Key Vault and key rotation this project does not run
  #checkov:skip=CKV_AZURE_206:Zone-redundant (Standard_ZRS) by default; geo-replication is a cost choice left to storage_sku (Standard_GZRS / Standard_RAGZRS)
  #checkov:skip=CKV_AZURE_33:Queue logging is done by Azure Monitor diagnostic settings on queueServices/default (StorageRead/Write/Delete to Log Analytics, monitoring.tf), not classic Storage Analytics logging
  name                            = "st${local.name}"
  resource_group_name             = var.resource_group_name
  location                        = var.location
  account_kind                    = "StorageV2"
  account_tier                    = local.storage_tier
  account_replication_type        = local.storage_replication
  https_traffic_only_enabled      = true
  min_tls_version                 = "TLS1_2"
  allow_nested_items_to_be_public = false
  shared_access_key_enabled       = false
  default_to_oauth_authentication = true

  blob_properties {
    versioning_enabled = true

    delete_retention_policy {
      days = 7
    }

    container_delete_retention_policy {
      days = 7
    }
  }

  # Flex Consumption and Container Apps run here without a VNet: the network
  # default stays Allow and access is guarded by Entra ID + RBAC.
  network_rules {
    default_action = "Allow"
    bypass         = ["AzureServices"]
  }

  tags = var.tags
}

resource "azurerm_storage_container" "data" {
  #checkov:skip=CKV2_AZURE_21:Blob read/write/delete logging is done by the Azure Monitor diagnostic setting on blobServices/default (monitoring.tf), not by a log_analytics_storage_insights resource
  for_each = local.blob_containers

  name                  = each.key
  storage_account_id    = azurerm_storage_account.data.id
  container_access_type = "private"
}

resource "azurerm_storage_queue" "data" {
  for_each = local.queues

  name               = each.key
  storage_account_id = azurerm_storage_account.data.id
}

# Files account: the "models" and "index" shares. Azure Files mounts in Function Apps and
# Container Apps authenticate with the account key, so shared keys stay on here.
resource "azurerm_storage_account" "files" {
  #checkov:skip=CKV2_AZURE_40:Shared keys must stay on: Azure Files mounts in Function Apps (storage_account block) and Container Apps (environment storage) authenticate only with the account key
  #checkov:skip=CKV_AZURE_35:Network default Allow on purpose: the function app and the Container Apps environment mount the share without a VNet
  #checkov:skip=CKV_AZURE_59:Public endpoint needed: the SMB mounts of the VNet-less function app and Container Apps environment reach it over the public endpoint
  #checkov:skip=CKV2_AZURE_33:No private endpoint: serverless VNet-less design (Flex Consumption without VNet integration, Container Apps environment without a VNet)
  #checkov:skip=CKV2_AZURE_1:Encrypted with Microsoft-managed keys; customer-managed keys need a Key Vault and key rotation this project does not run
  #checkov:skip=CKV_AZURE_206:Zone-redundant (storage_sku, Standard_ZRS by default); the shares hold model files that can be re-exported and re-uploaded and copies of index versions kept in the data account's blobs, so geo-replication is left as a cost choice
  #checkov:skip=CKV_AZURE_33:This account serves only the models and index file shares; it has no queues to log
  #checkov:skip=CKV2_AZURE_38:Blob soft delete is irrelevant: this account holds no blobs, only the models and index file shares
  name                            = "stf${local.name}"
  resource_group_name             = var.resource_group_name
  location                        = var.location
  account_kind                    = "StorageV2"
  account_tier                    = local.storage_tier
  account_replication_type        = local.storage_replication
  https_traffic_only_enabled      = true
  min_tls_version                 = "TLS1_2"
  allow_nested_items_to_be_public = false
  shared_access_key_enabled       = true

  # Keys are on for the SMB mounts only; any SAS signed from them is short-lived.
  sas_policy {
    expiration_period = "01.00:00:00"
    expiration_action = "Log"
  }

  tags = var.tags
}

resource "azurerm_storage_share" "models" {
  name               = "models"
  storage_account_id = azurerm_storage_account.files.id
  quota              = 10
}

# Published index versions (<version>/<file>), mirrored by the reindex job before it swaps the
# blob pointer, so the function app opens them from /mounts/index instead of downloading them.
resource "azurerm_storage_share" "index" {
  name               = "index"
  storage_account_id = azurerm_storage_account.files.id
  quota              = var.index_share_quota_gb
}
