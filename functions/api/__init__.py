"""The HTTP API's routers, one per resource; :func:`functions.http_api.create_app` assembles them."""
