// Container registry for the job image (built and pushed separately: see azure.yaml and job/Dockerfile).
// Pulls use the user-assigned identity (AcrPull); the admin user and anonymous pull are off.

param registryName string

param location string

param tags object

@description('Resource id of the user-assigned identity (role assignment names).')
param identityId string

@description('Principal id of the user-assigned identity (role assignments).')
param identityPrincipalId string

var acrPull = '7f951dff-4718-4b4c-9c0f-d35bf9ccbe74'

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' = {
  // checkov:skip=CKV_AZURE_139:Public network access is needed: the VNet-less Container Apps environment pulls over the public endpoint, and registry network rules/private endpoints need the Premium SKU; pulls and pushes require Entra ID (admin user and anonymous pull are off).
  // checkov:skip=CKV_AZURE_163:This check only asks for the Standard/Premium SKU; image vulnerability scanning is Microsoft Defender for Containers, enabled per subscription (it scans Basic registries too), not a property of this template. Basic is enough for one image.
  // checkov:skip=CKV_AZURE_166:Image quarantine is a Premium-SKU feature; the Basic registry holds a single image that this project builds and pushes itself.
  // checkov:skip=CKV_AZURE_233:Zone redundancy is a Premium-SKU feature; the Basic registry is only read when a job execution starts, and the image can be rebuilt from job/Dockerfile.
  name: registryName
  location: location
  tags: tags
  sku: {
    name: 'Basic'
  }
  properties: {
    adminUserEnabled: false
    anonymousPullEnabled: false
    publicNetworkAccess: 'Enabled'
  }
}

resource registryPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(registry.id, identityId, acrPull)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPull)
    principalId: identityPrincipalId
    principalType: 'ServicePrincipal'
  }
}

output id string = registry.id
output name string = registry.name
output loginServer string = registry.properties.loginServer
