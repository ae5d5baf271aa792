resource "azurerm_eventgrid_system_topic" "storage" {
  name                = "evgt-${local.name}"
  resource_group_name = var.resource_group_name
  location            = var.location
  source_resource_id  = azurerm_storage_account.data.id
  topic_type          = "Microsoft.Storage.StorageAccounts"

  # Used to dead-letter into the data account (shared keys are off there).
  identity {
    type         = "UserAssigned"
    identity_ids = [azurerm_user_assigned_identity.main.id]
  }

  tags = var.tags
}

# BlobCreated in "uploads" -> the blob extension webhook of ingest_blob.
resource "azurerm_eventgrid_system_topic_event_subscription" "blob_uploads" {
  name                  = "blob-uploads"
  system_topic          = azurerm_eventgrid_system_topic.storage.name
  resource_group_name   = var.resource_group_name
  event_delivery_schema = "EventGridSchema"
  included_event_types  = ["Microsoft.Storage.BlobCreated"]

  subject_filter {
    subject_begins_with = "/blobServices/default/containers/uploads/"
  }

  advanced_filter {
    string_in {
      key    = "data.api"
      values = ["PutBlob", "PutBlockList", "CopyBlob"]
    }
  }

  webhook_endpoint {
    url = "https://${azurerm_function_app_flex_consumption.main.default_hostname}/runtime/webhooks/blobs?functionName=Host.Functions.ingest_blob&code=${data.azurerm_function_app_host_keys.main.blobs_extension_key}"
  }

  retry_policy {
    max_delivery_attempts = 30
    event_time_to_live    = 1440
  }

  dead_letter_identity {
    type                   = "UserAssigned"
    user_assigned_identity = azurerm_user_assigned_identity.main.id
  }

  storage_blob_dead_letter_destination {
    storage_account_id          = azurerm_storage_account.data.id
    storage_blob_container_name = azurerm_storage_container.data["quarantine"].name
  }

  depends_on = [azurerm_role_assignment.identity]
}
