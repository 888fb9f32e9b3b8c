"""`python -m finetune_trainer --spec /etc/finetune/spec.yaml`: the trainer pod's command."""

import sys

from finetune_trainer.runtime import pod_main

if __name__ == "__main__":
    sys.exit(pod_main())
