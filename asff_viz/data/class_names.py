"""Class names of the COCO 2017 detection categories, in the order of their sorted category ids."""

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
# COCO category ids of the classes above (the dataset skips some ids).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
    34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60,
    61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
assert len(COCO_CLASSES) == len(COCO_CATEGORY_IDS) == 80


def is_placeholder(names: list[str] | tuple[str, ...]) -> bool:
    """Names that carry no meaning (`class_0`, `class_1`, ...: a checkpoint saved without its class names)."""
    return all(name == f"class_{index}" for index, name in enumerate(names))


class ClassMismatchError(ValueError):
    """A model's classes are not the dataset's: every number computed from the pair would be wrong."""


def match_classes(model_names: list[str] | tuple[str, ...], dataset_names: list[str] | tuple[str, ...],
                  model_source: str, dataset_source: str) -> tuple[list[int], str | None]:
    """Map each model class to the dataset class of the same name.

    Returns (dataset class index of each model label, a warning or None). Classes are matched by name; by
    position only when the checkpoint has no names (`class_i`), with a warning; a reordered category list is
    matched by name, with a warning. Raises ClassMismatchError when the names or counts differ.
    """
    model_names, dataset_names = [str(n) for n in model_names], [str(n) for n in dataset_names]
    if len(model_names) != len(dataset_names):
        raise ClassMismatchError(
            f"{dataset_source} has {len(dataset_names)} categories but {model_source} predicts "
            f"{len(model_names)} classes; use a checkpoint trained on this category set.")
    if model_names == dataset_names:
        return list(range(len(model_names))), None
    if is_placeholder(model_names):
        return list(range(len(model_names))), (
            f"{model_source} stores no class names: its classes are matched to the categories of "
            f"{dataset_source} by position (sorted category id), which is right only if it was trained so.")
    if len(set(dataset_names)) != len(dataset_names) or set(model_names) != set(dataset_names):
        only_model = sorted(set(model_names) - set(dataset_names))
        only_data = sorted(set(dataset_names) - set(model_names))
        detail = "; ".join(part for part in (
            f"only in the checkpoint: {', '.join(only_model[:5])}" if only_model else "",
            f"only in the dataset: {', '.join(only_data[:5])}" if only_data else "") if part) or \
            "a name repeats in the dataset"
        raise ClassMismatchError(f"the classes of {model_source} are not the categories of {dataset_source} "
                                 f"({detail}); use a checkpoint trained on these categories.")
    index = {name: position for position, name in enumerate(dataset_names)}
    moved = sum(index[name] != label for label, name in enumerate(model_names))
    return [index[name] for name in model_names], (
        f"{dataset_source} orders its categories differently from {model_source} ({moved} of "
        f"{len(model_names)} at another position): classes are matched by name.")
