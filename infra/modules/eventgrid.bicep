// Event Grid system topic on the data account. Its subscription (BlobCreated in `uploads` -> the Function
// App's blob extension webhook) is NOT here: the webhook URL carries the host's `blobs_extension` system
// key, which exists only once the app's code is deployed and the host has started, and `azd up` provisions
// before it deploys. The postdeploy hook (azure.yaml, infra/hooks/) waits for that key and deploys
// infra/blob-events.bicep.

param systemTopicName string

param location string

param tags object

param identityId string

@description('Resource id of the data storage account (the topic source).')
param dataAccountId string

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = {
  name: systemTopicName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    source: dataAccountId
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

output systemTopicName string = systemTopic.name
