"""Datasets, the unlabeled pool, the class-incremental stream, and on-device batch augmentation."""
