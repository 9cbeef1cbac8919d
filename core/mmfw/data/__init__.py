"""The data path of training and evaluation: batches, bad-data policy, image cache, augmentation.

Public for plugins: :class:`~mmfw.data.batching.Batch` and :class:`~mmfw.data.batching.Collate`
(what a training batch is and how rows become one).
"""
