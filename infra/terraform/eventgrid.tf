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

# The second phase (docs/deploy.md): the webhook URL carries the host's blobs_extension
# system key, which the Functions host creates only once the code with the Event Grid blob
# trigger runs. A first apply cannot have it, so the subscription and the key lookup wait
# for blob_events_enabled = true, set after the code is published.
data "azurerm_function_app_host_keys" "main" {
  count = var.blob_events_enabled ? 1 : 0

  name                = azurerm_function_app_flex_consumption.main.name
  resource_group_name = var.resource_group_name
}

# BlobCreated in "uploads" -> the blob extension webhook of ingest_blob.
resource "azurerm_eventgrid_system_topic_event_subscription" "blob_uploads" {
  count = var.blob_events_enabled ? 1 : 0

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
    url = "https://${azurerm_function_app_flex_consumption.main.default_hostname}/runtime/webhooks/blobs?functionName=Host.Functions.ingest_blob&code=${data.azurerm_function_app_host_keys.main[0].blobs_extension_key}"
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

  lifecycle {
    precondition {
      condition     = data.azurerm_function_app_host_keys.main[0].blobs_extension_key != ""
      error_message = "The function app has no blobs_extension key yet: publish its code first (docs/deploy.md), open https://<app>/api/health once so the host starts, wait a minute and apply again."
    }
  }

  depends_on = [azurerm_role_assignment.identity]
}
