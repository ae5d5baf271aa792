// clusterlens on Azure (azd): Flex Consumption Function App (HTTP API, page, blob trigger via Event Grid,
// timers) + Container Apps job on a serverless GPU (the heavy work, started by KEDA from the jobs queue).
// Everything authenticates with one user-assigned identity; the data account has shared keys disabled.
// infra/terraform/ describes the same system (infra/app-settings.json is shared by both).
targetScope = 'resourceGroup'

@minLength(1)
@maxLength(64)
@description('azd environment name (tag azd-env-name).')
param environmentName string

@description('Region of every resource.')
param location string = resourceGroup().location

@minLength(3)
@maxLength(11)
@description('Name prefix: 3-11 lower-case letters and digits.')
param namePrefix string = 'clens'

@allowed([
  'Consumption-GPU-NC8as-T4'
  'Consumption-GPU-NC24-A100'
])
@description('Serverless GPU workload profile of the Container Apps job.')
param gpuProfileType string = 'Consumption-GPU-NC8as-T4'

@minValue(1)
@description('Replicas per job execution.')
param jobParallelism int = 1

@minValue(1)
@description('Most concurrent job executions started by the queue scaler.')
param jobMaxExecutions int = 4

@description('Tag of the job image in the registry (used when jobImage is empty).')
param jobImageTag string = 'latest'

@description('Full job image name; empty means <registry login server>/clusterlens-job:<jobImageTag>.')
param jobImage string = ''

@description('Replication SKU of the storage accounts.')
param storageSku string = 'Standard_ZRS'

var name = '${namePrefix}${substring(uniqueString(resourceGroup().id), 0, 6)}'
var tags = {
  app: 'clusterlens'
  'azd-env-name': environmentName
}

// Every module takes the identity it grants roles to; the role assignments (Storage Blob Data Owner, Storage
// Queue Data Contributor, Storage File Data Privileged Reader, AcrPull, Monitoring Metrics Publisher) live
// beside the resource they are scoped to. The app settings are loaded from infra/app-settings.json
// (shared with infra/terraform) by modules/functions.bicep and modules/containerapps.bicep.

module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    name: 'id-${name}'
    location: location
    tags: tags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    workspaceName: 'log-${name}'
    appInsightsName: 'appi-${name}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityPrincipalId: identity.outputs.principalId
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    dataAccountName: 'st${name}'
    filesAccountName: 'stf${name}'
    location: location
    tags: tags
    storageSku: storageSku
    workspaceId: monitoring.outputs.workspaceId
    identityId: identity.outputs.id
    identityPrincipalId: identity.outputs.principalId
  }
}

module registry 'modules/registry.bicep' = {
  name: 'registry'
  params: {
    registryName: 'cr${name}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityPrincipalId: identity.outputs.principalId
  }
}

// Depends on storage and monitoring (their outputs), so the identity's roles exist before the app starts.
module functions 'modules/functions.bicep' = {
  name: 'functions'
  params: {
    planName: 'plan-${name}'
    functionAppName: 'func-${name}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    dataAccountName: storage.outputs.dataAccountName
    blobEndpoint: storage.outputs.blobEndpoint
    filesAccountName: storage.outputs.filesAccountName
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
  }
}

module eventgrid 'modules/eventgrid.bicep' = {
  name: 'eventgrid'
  params: {
    systemTopicName: 'evgt-${name}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    dataAccountId: storage.outputs.dataAccountId
    functionAppId: functions.outputs.id
    functionAppHostName: functions.outputs.defaultHostName
  }
}

// Depends on registry and storage (their outputs): AcrPull and the queue role exist before the job pulls or scales.
module containerapps 'modules/containerapps.bicep' = {
  name: 'containerapps'
  params: {
    environmentName: 'cae-${name}'
    jobName: 'caj-${name}-worker'
    location: location
    tags: tags
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    workspaceName: monitoring.outputs.workspaceName
    appInsightsConnectionString: monitoring.outputs.appInsightsConnectionString
    dataAccountName: storage.outputs.dataAccountName
    blobEndpoint: storage.outputs.blobEndpoint
    filesAccountName: storage.outputs.filesAccountName
    registryLoginServer: registry.outputs.loginServer
    jobImage: empty(jobImage) ? '${registry.outputs.loginServer}/clusterlens-job:${jobImageTag}' : jobImage
    gpuProfileType: gpuProfileType
    jobParallelism: jobParallelism
    jobMaxExecutions: jobMaxExecutions
  }
}

output functionAppUrl string = 'https://${functions.outputs.defaultHostName}'
output searchPageUrl string = 'https://${functions.outputs.defaultHostName}/'
output storageBlobEndpoint string = storage.outputs.blobEndpoint
output containerRegistryLoginServer string = registry.outputs.loginServer
output jobName string = containerapps.outputs.jobName
output identityClientId string = identity.outputs.clientId
output resourceGroup string = resourceGroup().name
