"""The ``translation_kd`` task: fairseq translation plus a frozen teacher."""

import logging
import os
from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from fairseq_kd.tasks.kd_teacher import KDTeacherConfig, KDTeacherMixin
from fairseq_kd.topk_dataset import TEACHER_KEY, TopKTeacherDataset

logger = logging.getLogger(__name__)

__all__ = ["TEACHER_KEY", "TranslationKDConfig", "TranslationKDTask"]


@dataclass
class TranslationKDConfig(TranslationConfig, KDTeacherConfig):
    """Translation options plus where the teacher comes from."""

    valid_subset: str = II("dataset.valid_subset")
    disable_validation: bool = II("dataset.disable_validation")


@register_task("translation_kd", dataclass=TranslationKDConfig)
class TranslationKDTask(KDTeacherMixin, TranslationTask):
    """Translation with a teacher whose distributions ride along in the sample.

    The teacher logic (live teacher or ensemble, top-k stores, their checks,
    ``train_step``/``valid_step``) is :class:`KDTeacherMixin`'s, shared with
    ``translation_multi_simple_epoch_kd``. Before each training or validation
    step, the teacher's float32 log-probabilities at temperature 1 are
    attached to the sample as ``sample["teacher"] = {"lprobs": B x T x S,
    "indices": B x T x S}`` (``indices`` is absent when ``S`` is the whole
    vocabulary; a live teacher gives its top-``K`` when the criterion's
    ``kd_topk`` is ``K``). A criterion such as ``word_kd`` reads them from
    there, whatever produced them.

    Args:
        cfg: the task config.
        src_dict: source dictionary.
        tgt_dict: target dictionary.
    """

    cfg: TranslationKDConfig

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        """Load a split; with ``--teacher-topk``, attach its verified store.

        Args:
            split: the split's name.
            epoch: fairseq's epoch (selects the data shard).
            combine: concatenate ``split``, ``split1``... as fairseq does.
        """
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if not self.cfg.teacher_topk:
            return
        dataset = self.datasets[split]
        store = self.verified_store(
            f"split '{split}'",
            self.topk_store_path(split, epoch),
            dataset,
            self.source_dictionary,
            self.target_dictionary,
            split,
            os.path.join(self.cfg.teacher_topk, split),
        )
        if store is not None:
            self.datasets[split] = TopKTeacherDataset(
                dataset, store, self.target_dictionary.pad()
            )
