// Event Grid system topic on the data account; BlobCreated in `uploads` goes to the Function App's blob
// extension webhook (the `ingest_blob` function, blob trigger with source EventGrid). Dead letters go to
// the `quarantine` container, written with the user-assigned identity.
//
// The webhook URL carries the `blobs_extension` system key, which the Functions host creates when the app
// code with the Event Grid blob trigger runs: on a fresh environment run `azd deploy` (or `azd up`) before
// this subscription can be created, i.e. provision again after the first deploy if the first provision
// stops here.

param systemTopicName string

param location string

param tags object

param identityId string

@description('Resource id of the data storage account (the topic source and the dead-letter account).')
param dataAccountId string

@description('Resource id of the Function App.')
param functionAppId string

@description('Default host name of the Function App.')
param functionAppHostName string

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

resource blobUploads 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: systemTopic
  name: 'blob-uploads'
  properties: {
    destination: {
      endpointType: 'WebHook'
      properties: {
        endpointUrl: 'https://${functionAppHostName}/runtime/webhooks/blobs?functionName=Host.Functions.ingest_blob&code=${listKeys('${functionAppId}/host/default', '2023-12-01').systemKeys.blobs_extension}'
      }
    }
    filter: {
      includedEventTypes: [
        'Microsoft.Storage.BlobCreated'
      ]
      subjectBeginsWith: '/blobServices/default/containers/uploads/'
      advancedFilters: [
        {
          operatorType: 'StringIn'
          key: 'data.api'
          values: [
            'PutBlob'
            'PutBlockList'
            'CopyBlob'
          ]
        }
      ]
    }
    eventDeliverySchema: 'EventGridSchema'
    retryPolicy: {
      maxDeliveryAttempts: 30
      eventTimeToLiveInMinutes: 1440
    }
    deadLetterWithResourceIdentity: {
      identity: {
        type: 'UserAssigned'
        userAssignedIdentity: identityId
      }
      deadLetterDestination: {
        endpointType: 'StorageBlob'
        properties: {
          resourceId: dataAccountId
          blobContainerName: 'quarantine'
        }
      }
    }
  }
}

output systemTopicName string = systemTopic.name
output eventSubscriptionName string = blobUploads.name
