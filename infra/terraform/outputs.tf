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

output "job_name" {
  description = "The Container Apps job."
  value       = azurerm_container_app_job.worker.name
}

output "identity_client_id" {
  description = "Client id of the user-assigned identity."
  value       = azurerm_user_assigned_identity.main.client_id
}

output "resource_group_name" {
  description = "The resource group."
  value       = var.resource_group_name
}
