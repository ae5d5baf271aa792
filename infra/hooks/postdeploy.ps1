# azd postdeploy hook (azure.yaml), PowerShell twin of postdeploy.sh: wait for the Functions host's
# blobs_extension key, then deploy infra/blob-events.bicep (the Event Grid subscription). See postdeploy.sh.
$ErrorActionPreference = 'Stop'

foreach ($cmd in 'az') {
  if (-not (Get-Command $cmd -ErrorAction SilentlyContinue)) {
    throw "postdeploy: '$cmd' is not installed (docs/deploy.md, Prerequisites)"
  }
}
if (-not $env:AZURE_RESOURCE_GROUP) { throw 'postdeploy: AZURE_RESOURCE_GROUP is not set (run through azd)' }
if (-not $env:AZURE_FUNCTION_APP_NAME) { throw 'postdeploy: the main.bicep outputs are missing (run through azd)' }

$root = (Resolve-Path (Join-Path $PSScriptRoot '../..')).Path
$hostName = az functionapp show -n $env:AZURE_FUNCTION_APP_NAME -g $env:AZURE_RESOURCE_GROUP --query defaultHostName -o tsv
$wait = if ($env:CLUSTERLENS_KEY_WAIT_SECONDS) { [int]$env:CLUSTERLENS_KEY_WAIT_SECONDS } else { 600 }
$deadline = (Get-Date).AddSeconds($wait)
$key = ''
while (-not $key) {
  # Any request starts an instance; the host creates its system keys as it starts.
  try { Invoke-WebRequest -Uri "https://$hostName/api/health" -TimeoutSec 30 -UseBasicParsing | Out-Null } catch { }
  $key = az functionapp keys list -n $env:AZURE_FUNCTION_APP_NAME -g $env:AZURE_RESOURCE_GROUP --query systemKeys.blobs_extension -o tsv 2>$null
  if (-not $key) {
    if ((Get-Date) -ge $deadline) {
      throw "postdeploy: no blobs_extension key on $($env:AZURE_FUNCTION_APP_NAME) yet; check the app's logs, then run: azd hooks run postdeploy"
    }
    Write-Host "postdeploy: waiting for the host's blobs_extension key..."
    Start-Sleep -Seconds 15
  }
}

az deployment group create --resource-group $env:AZURE_RESOURCE_GROUP --name blob-events `
  --template-file (Join-Path $root 'infra/blob-events.bicep') --output none `
  --parameters systemTopicName=$env:CLUSTERLENS_SYSTEM_TOPIC_NAME functionAppName=$env:AZURE_FUNCTION_APP_NAME `
  identityId=$env:CLUSTERLENS_IDENTITY_ID dataAccountName=$env:CLUSTERLENS_DATA_ACCOUNT_NAME
if ($LASTEXITCODE -ne 0) { throw 'postdeploy: the Event Grid subscription deployment failed' }
Write-Host 'postdeploy: blobs created in uploads/ now reach ingest_blob'
