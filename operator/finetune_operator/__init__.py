"""finetune_operator: the kopf operator that turns FineTuneJobs into GPU-scheduled trainer Jobs.

Pure parts (no cluster): `builders` (Job and ConfigMap manifests), `status` (status from the Job
and its pods), `progress` (status from the trainer's /metrics), `rbac` (the permissions it needs),
`config` (settings from the environment). Cluster-facing parts: `kube` (API calls), `handlers`
(thin kopf handlers), `loops` (progress polling and TTL), `leader` (Lease-based leader election),
`__main__` (the `finetune-operator` entry point). It never imports torch.
"""
