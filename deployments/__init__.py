"""The attribution service on Ray Serve, and the `attribute-ray` command that starts it.

    config.py     AppArgs: the service's one configuration (the builder's argument)
    app.py        app_builder: AppArgs → Ingress + AttributionEngine (`serve run deployments.app:app_builder`)
    engine.py     AttributionEngine: the resident model; attribution, interventions and steering in a thread
    ingress.py    Ingress: the HTTP routes (FastAPI), validation, backpressure, the graph store
    job_table.py  graph jobs by id and by graph key (plain asyncio, no Ray)
    encoding.py   JSON or msgpack in and out
    cli.py        `attribute-ray`: the library's commands plus `serve`
"""
