# azd postprovision hook (azure.yaml), PowerShell twin of postprovision.sh: build the two job images in the
# registry (az acr build) and point the jobs at them. See postprovision.sh for the why.
$ErrorActionPreference = 'Stop'
$PSNativeCommandUseErrorActionPreference = $true

foreach ($cmd in 'az', 'azd') {
  if (-not (Get-Command $cmd -ErrorAction SilentlyContinue)) {
    throw "postprovision: '$cmd' is not installed (docs/deploy.md, Prerequisites)"
  }
}
if (-not $env:AZURE_RESOURCE_GROUP) { throw 'postprovision: AZURE_RESOURCE_GROUP is not set (run through azd)' }
if (-not $env:CLUSTERLENS_REGISTRY_NAME) { throw 'postprovision: the main.bicep outputs are missing (run through azd)' }

if ($env:CLUSTERLENS_SKIP_IMAGE_BUILD -eq 'true') {
  Write-Host 'postprovision: CLUSTERLENS_SKIP_IMAGE_BUILD=true: not building the job images'
  exit 0
}
if ($env:CLUSTERLENS_GPU_JOB_IMAGE -and $env:CLUSTERLENS_CPU_JOB_IMAGE -and $env:CLUSTERLENS_REBUILD_JOB_IMAGES -ne 'true') {
  Write-Host "postprovision: the jobs already run $($env:CLUSTERLENS_GPU_JOB_IMAGE) and $($env:CLUSTERLENS_CPU_JOB_IMAGE)"
  exit 0
}

$root = (Resolve-Path (Join-Path $PSScriptRoot '../..')).Path
$tag = (Get-Date).ToUniversalTime().ToString('yyyyMMddHHmmss')
$server = az acr show -n $env:CLUSTERLENS_REGISTRY_NAME --query loginServer -o tsv

function Build-JobImage([string]$Name, [string]$Variant, [string]$Job, [string]$Variable) {
  $image = "$server/${Name}:$tag"
  Write-Host "postprovision: building $image (VARIANT=$Variant) in $($env:CLUSTERLENS_REGISTRY_NAME)"
  az acr build --registry $env:CLUSTERLENS_REGISTRY_NAME --image "${Name}:$tag" --image "${Name}:latest" `
    --build-arg "VARIANT=$Variant" --file (Join-Path $root 'job/Dockerfile') --platform linux/amd64 --timeout 7200 $root
  az containerapp job update --name $Job --resource-group $env:AZURE_RESOURCE_GROUP --image $image --output none
  azd env set $Variable $image
}

Build-JobImage 'clusterlens-job-cpu' 'cpu' $env:CLUSTERLENS_CPU_JOB_NAME 'CLUSTERLENS_CPU_JOB_IMAGE'
Build-JobImage 'clusterlens-job' 'gpu' $env:CLUSTERLENS_GPU_JOB_NAME 'CLUSTERLENS_GPU_JOB_IMAGE'
Write-Host "postprovision: both jobs run the images built from this checkout ($tag)"
