"""Scale-out deployment: replicas of the server on Ray Serve (``ray_serve.py``, started by
``trt-gemma serve --replicas N`` through ``launch.py``); the Kubernetes manifests and Dockerfiles
live in the repository's ``deploy/`` directory. Importing this package imports no Ray."""
