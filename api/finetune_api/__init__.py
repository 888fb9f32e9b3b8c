"""The FineTuneJob API (finetune.dev/v1alpha1): its one schema, validation and CRD generation.

`schema.py` is the single source of truth. `crd.py` renders the CustomResourceDefinition that lives
in `crds/` and in the Helm chart; `validation.py` checks a manifest locally with the same schema and
the same CEL rules the API server enforces. This package needs no torch and no kopf, so both the
operator and the trainer depend on it.
"""

GROUP = "finetune.dev"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
API_VERSION = f"{GROUP}/{VERSION}"
