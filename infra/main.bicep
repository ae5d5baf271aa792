// clusterlens on Azure (azd): Flex Consumption Function App (HTTP API, page, blob trigger via Event Grid,
// timers) + two Container Apps jobs started by KEDA from their queues: embedding and head training on a
// serverless GPU (`jobs-gpu`), reindex, retrain and analysis on the Consumption CPU profile (`jobs`).
// Everything authenticates with one user-assigned identity; the data account has shared keys disabled.
// infra/terraform/ describes the same system (infra/app-settings.json is shared by both).
//
// What `azd up` does, in order (azure.yaml): provision this file (the jobs start on a placeholder image,
// since a Container Apps job cannot be created with an image that is not in the registry yet), then the
// postprovision hook builds the two job images in the registry (az acr build) and points the jobs at them,
// then the Function App's code is deployed, then the postdeploy hook waits for the host's blobs_extension
// key and creates the Event Grid subscription (infra/blob-events.bicep): that key exists only once the
// code runs, so the subscription cannot be part of this provisioning.
targetScope = 'resourceGroup'

@minLength(1)
@maxLength(64)
@description('azd environment name (tag azd-env-name).')
param environmentName string

// Serverless GPU workload profiles (T4 and A100) are offered in these regions only, and a GPU profile can
// only be added to a Container Apps environment when it is created
// (https://learn.microsoft.com/azure/container-apps/workload-profiles-overview).
@allowed([
  'swedencentral'
  'westus3'
  'australiaeast'
])
@metadata({
  azd: {
    type: 'location'
  }
})
@description('Region of every resource: one with serverless GPU profiles.')
param location string = 'swedencentral'

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
@description('Replicas per GPU job execution (each one a GPU, billed).')
param jobParallelism int = 1

@minValue(1)
@description('Most concurrent GPU job executions started by the queue scaler.')
param jobMaxExecutions int = 4

@minValue(1)
@description('Most concurrent CPU job executions started by the queue scaler.')
param cpuJobMaxExecutions int = 2

@description('GPU job image (job/Dockerfile, default target); empty: a placeholder until the postprovision hook has built it.')
param gpuJobImage string = ''

@description('CPU job image (job/Dockerfile, VARIANT=cpu); empty: a placeholder until the postprovision hook has built it.')
param cpuJobImage string = ''

@description('Object id of the person or service principal deploying (azd sets AZURE_PRINCIPAL_ID); empty grants nothing.')
param principalId string = ''

@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
@description('Kind of principalId.')
param principalType string = 'User'

@description('Replication SKU of the storage accounts.')
param storageSku string = 'Standard_ZRS'

// A 10M-image IVF-PQ version is about 10 GB of files (ids, codes, re-ranking vectors); the share holds the
// kept versions (CLUSTERLENS_INDEX_KEEP_VERSIONS, 3), a base segment they may share and the one being
// published. Standard (pay-as-you-go) shares bill the bytes stored, not the quota: this is a ceiling.
@description('Quota of the `index` Azure Files share in GiB (published index versions, opened in place by the function app).')
@minValue(1)
@maxValue(102400)
param indexShareQuotaGb int = 50

var name = '${namePrefix}${substring(uniqueString(resourceGroup().id), 0, 6)}'
var tags = {
  app: 'clusterlens'
  'azd-env-name': environmentName
}

// Every module takes the identity it grants roles to; the role assignments (Storage Blob Data Owner, Storage
// Queue Data Contributor, AcrPull, Monitoring Metrics Publisher) live beside the resource they are scoped
// to. The deploying principal gets the data roles the checks in docs/deploy.md need (upload a blob, read
// the queues). The app settings are loaded from infra/app-settings.json
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
    indexShareQuotaGb: indexShareQuotaGb
    workspaceId: monitoring.outputs.workspaceId
    identityId: identity.outputs.id
    identityPrincipalId: identity.outputs.principalId
    deployerPrincipalId: principalId
    deployerPrincipalType: principalType
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

// The system topic only: its subscription is infra/blob-events.bicep, deployed by the postdeploy hook.
module eventgrid 'modules/eventgrid.bicep' = {
  name: 'eventgrid'
  params: {
    systemTopicName: 'evgt-${name}'
    location: location
    tags: tags
    identityId: identity.outputs.id
    dataAccountId: storage.outputs.dataAccountId
  }
}

// Depends on registry and storage (their outputs): AcrPull and the queue role exist before a job pulls or scales.
module containerapps 'modules/containerapps.bicep' = {
  name: 'containerapps'
  params: {
    environmentName: 'cae-${name}'
    jobNamePrefix: 'caj-${name}'
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
    gpuJobImage: gpuJobImage
    cpuJobImage: cpuJobImage
    gpuProfileType: gpuProfileType
    jobParallelism: jobParallelism
    jobMaxExecutions: jobMaxExecutions
    cpuJobMaxExecutions: cpuJobMaxExecutions
  }
}

output functionAppUrl string = 'https://${functions.outputs.defaultHostName}'
output searchPageUrl string = 'https://${functions.outputs.defaultHostName}/'
output storageBlobEndpoint string = storage.outputs.blobEndpoint
output containerRegistryLoginServer string = registry.outputs.loginServer
output gpuJobName string = containerapps.outputs.gpuJobName
output cpuJobName string = containerapps.outputs.cpuJobName
output identityClientId string = identity.outputs.clientId
output resourceGroup string = resourceGroup().name
// Read by the hooks in infra/hooks/ (azd passes every output to them as an environment variable).
output AZURE_FUNCTION_APP_NAME string = functions.outputs.name
output CLUSTERLENS_REGISTRY_NAME string = registry.outputs.name
output CLUSTERLENS_GPU_JOB_NAME string = containerapps.outputs.gpuJobName
output CLUSTERLENS_CPU_JOB_NAME string = containerapps.outputs.cpuJobName
output CLUSTERLENS_SYSTEM_TOPIC_NAME string = eventgrid.outputs.systemTopicName
output CLUSTERLENS_IDENTITY_ID string = identity.outputs.id
output CLUSTERLENS_DATA_ACCOUNT_NAME string = storage.outputs.dataAccountName
