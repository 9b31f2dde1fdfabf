"""Data: the dataset table and readers, class groups and batch orders, on-device augmentation."""
