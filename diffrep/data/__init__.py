"""Data loaders: Fashion-MNIST from local IDX files, MNI152 / NIfTI brain slices, synthetic lesions,
augmentation. May import only the shared helpers (errors); imported by training, anomaly, the
pipelines, the CLI and the benchmarks.
"""
from .augment import augment_batch, brain_augmentation
from .brain import (LABEL_NAMES, MNI152_FILES, NUM_CLASSES, SPLITS, BrainSlices, check_labels, find_mni152,
                    load_brain_slices, load_brain_split, load_volume)
from .fashion_mnist import (FASHION_MNIST_CLASSES, download_fashion_mnist, find_fashion_mnist, load_fashion_mnist,
                            read_idx, to_tensor_images)

__all__ = [
    "BrainSlices", "FASHION_MNIST_CLASSES", "LABEL_NAMES", "MNI152_FILES", "NUM_CLASSES", "SPLITS",
    "augment_batch", "brain_augmentation", "check_labels", "download_fashion_mnist", "find_fashion_mnist",
    "find_mni152", "load_brain_slices", "load_brain_split", "load_fashion_mnist", "load_volume", "read_idx",
    "to_tensor_images",
]
