"""Azure Functions entry point: builds the app and registers blueprints. No logic here."""

import azure.functions as func

from functions import blob_ingest, timers
from functions.http_api import create_app

app = func.AsgiFunctionApp(app=create_app(), http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(blob_ingest.bp)
app.register_functions(timers.bp)
