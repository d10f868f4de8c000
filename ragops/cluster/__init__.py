"""From laptop to cluster: Ray job submission, a local Ray head, KubeRay manifests.

Modules (none imports Ray at import time; Ray is imported inside the functions that talk to a
cluster):

* :mod:`.errors` — user-facing errors of this package;
* :mod:`.connection` — which Ray dashboard to talk to (``--address``, ``RAY_ADDRESS``,
  ``ray.address``, a local head) and which token to send;
* :mod:`.localhead` — ``ragops cluster up|down|status``: a local Ray head with the Jobs API
  and token authentication, for users and tests without a cluster;
* :mod:`.entrypoint` — turning a command line into a job: entrypoint string, runtime_env,
  the job's effective settings and the checks made before submission;
* :mod:`.jobs` — the Ray Job SDK wrapped: submit, follow logs, wait, status, stop, list;
* :mod:`.envconfig` — settings as ``RAGOPS_*`` environment variables (how manifests ship
  the configuration);
* :mod:`.resources` — CPU/GPU needs of each stage from settings, and the worker groups
  that satisfy them;
* :mod:`.kuberay` — RayJob / RayService / RayCluster manifests.
"""
