"""The worker side: Celery app, the routing task, model acquisition and the routing engine.

Flow inside one worker host::

    parent (worker_init)        acquire.acquire_model: S3/local -> sha256 -> cache (file lock)
    each child (process_init)   engine.RoutingEngine: mmap the GGUF, evaluate the prefix once
    each ticket (tasks)         validate -> engine.route -> results.publish_result (exactly once)
"""
