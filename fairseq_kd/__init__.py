"""fairseq-kd: knowledge distillation for fairseq translation, as a plugin."""

__version__ = "0.1.0"

from fairseq_kd import compat, shutdown  # noqa: E402

compat.allow_fairseq_checkpoint_types()
shutdown.register()

from fairseq_kd import criterions, tasks  # noqa: E402,F401
