output "function_app_url" {
  description = "Base URL of the function app."
  value       = "https://${azurerm_function_app_flex_consumption.main.default_hostname}"
}

output "search_page_url" {
  description = "The search page."
  value       = "https://${azurerm_function_app_flex_consumption.main.default_hostname}/"
}

output "storage_blob_endpoint" {
  description = "Blob endpoint of the data account."
  value       = azurerm_storage_account.data.primary_blob_endpoint
}

output "container_registry_login_server" {
  description = "Where to push the clusterlens-job image."
  value       = azurerm_container_registry.main.login_server
}

output "gpu_job_name" {
  description = "The Container Apps job on the GPU profile (embed, train_head)."
  value       = azurerm_container_app_job.worker["gpu"].name
}

output "cpu_job_name" {
  description = "The Container Apps job on the Consumption profile (reindex, retrain, analyse, ingest_container, dedupe)."
  value       = azurerm_container_app_job.worker["cpu"].name
}

output "function_app_name" {
  description = "The function app (for publishing its code)."
  value       = azurerm_function_app_flex_consumption.main.name
}

output "identity_client_id" {
  description = "Client id of the user-assigned identity."
  value       = azurerm_user_assigned_identity.main.client_id
}

output "resource_group_name" {
  description = "The resource group."
  value       = var.resource_group_name
}
