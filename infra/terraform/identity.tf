# One identity for the function app, the Container Apps job and Event Grid.
resource "azurerm_user_assigned_identity" "main" {
  name                = "id-${local.name}"
  resource_group_name = var.resource_group_name
  location            = var.location
  tags                = var.tags
}
