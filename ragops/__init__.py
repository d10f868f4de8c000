"""ragops: documents → Ray Data → Qdrant → retrieval + generation → Ray Serve, one CLI.

The core package holds settings, schemas, the model registry, the vector-store protocol and
its Qdrant backends, and the run/artifact records. It never imports Ray at import time: Ray is
started on demand by the stages that need it.
"""

__version__ = "0.1.0"
