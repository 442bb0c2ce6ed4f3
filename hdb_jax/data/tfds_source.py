"""TensorFlow Datasets sources, read offline into numpy batches.

TensorFlow and ``tensorflow_datasets`` are an optional extra (``pip install hdb_jax[tfds]``)
and are imported only when :func:`tfds_images` is called, so ``import hdb_jax`` never loads
TensorFlow. When it is loaded, TensorFlow is hidden from every GPU so that it leaves the
accelerators to JAX.

Nothing here touches the network: datasets are prepared from files that are already on
disk (a prepared ``data_dir`` or a manual directory), never downloaded. For CelebA-HQ
(``celeb_a_hq/<resolution>``, see :func:`celeba_hq_builder_name`) the user has to produce
the archive ``data<R>x<R>.tar`` (PNG images, R = the resolution) with the
progressive-GAN preparation scripts and put it in ``manual_dir``.
"""

from __future__ import annotations

from typing import Iterator, Optional

_PIP_HINT = "pip install hdb_jax[tfds]"
CELEBA_HQ_RESOLUTIONS = tuple(2**k for k in range(11))  # 1 .. 1024


def celeba_hq_builder_name(resolution: int) -> str:
    """The TFDS name of the CelebA-HQ config at one resolution, e.g. "celeb_a_hq/256".

    Args:
      resolution: a power of two from 1 to 1024.

    Returns:
      The builder name to pass to :func:`tfds_images`.
    """
    if resolution not in CELEBA_HQ_RESOLUTIONS:
        raise ValueError(f"CelebA-HQ resolution must be one of {CELEBA_HQ_RESOLUTIONS}, got {resolution}")
    return f"celeb_a_hq/{resolution}"


def _import_tfds():
    """Imports (tensorflow, tensorflow_datasets), TensorFlow restricted to the CPU."""
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds  # first: fails fast when the extra is missing
    except ImportError as e:
        raise ImportError(
            f"TFDS sources need tensorflow and tensorflow-datasets: {_PIP_HINT}  (missing: {e.name or e})"
        ) from e
    try:
        tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # devices already initialised by the caller
        pass
    return tf, tfds


def download_and_prepare_kwargs(manual_dir: Optional[str] = None) -> dict:
    """Keyword arguments for ``DatasetBuilder.download_and_prepare`` that stay offline.

    Args:
      manual_dir: folder holding the manually obtained source files; None uses TFDS's
        default, ``<data_dir>/downloads/manual``.

    Returns:
      ``dict(download_config=tfds.download.DownloadConfig(...))`` with GCS disabled.
    """
    _, tfds = _import_tfds()
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    return dict(download_config=config)


def _prepare(tfds, name: str, data_dir: str, manual_dir: Optional[str]):
    """Returns the builder of ``name``, preparing it from local files if needed."""
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    if builder.is_prepared():
        return builder
    if not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        raise RuntimeError(
            f"TFDS dataset {name!r} is not prepared in {data_dir!r} and would need a download; "
            "hdb_jax reads TFDS offline only: prepare it elsewhere (tfds build) and copy it "
            "into data_dir"
        )
    builder.download_and_prepare(**download_and_prepare_kwargs(manual_dir))
    return builder


def _to_rgb_float(tf, image, channels: int):
    """uint8 / uint16 / float [H, W, C] -> float32 [H, W, 3] in [0, 1], alpha on white."""
    image = tf.image.convert_image_dtype(image, tf.float32)  # scales 16-bit, not clips
    if channels in (2, 4):  # gray + alpha, RGBA: composite on white
        color, alpha = image[..., : channels - 1], image[..., channels - 1 :]
        image = color * alpha + (1.0 - alpha)
    if channels in (1, 2):
        image = tf.image.grayscale_to_rgb(image)
    elif channels not in (3, 4):
        raise ValueError(f"images must have 1 to 4 channels, the feature has {channels}")
    return image


def _center_square(tf, image, resolution: int):
    """float32 [H, W, 3] -> [resolution, resolution, 3]: centre square crop, then resize."""
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    image = image[top : top + side, left : left + side]
    image = tf.cond(
        tf.equal(side, resolution),
        lambda: image,
        lambda: tf.clip_by_value(
            tf.image.resize(image, (resolution, resolution), method="lanczos3", antialias=True), 0.0, 1.0
        ),
    )
    return tf.reshape(image, (resolution, resolution, 3))


def tfds_images(
    name: str,
    split: str,
    *,
    data_dir: str,
    manual_dir: Optional[str] = None,
    resolution: int,
    image_key: str = "image",
    label_key: Optional[str] = None,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = False,
    drop_remainder: bool = True,
    shuffle_buffer: int = 1024,
) -> Iterator[dict]:
    """Iterates over a TFDS image dataset in numpy batches, offline.

    If the dataset is not yet prepared in ``data_dir`` it is built from ``manual_dir``
    (builders with manual download instructions only; anything that would download
    raises instead). For CelebA-HQ use ``name=celeba_hq_builder_name(R)`` and put
    ``data<R>x<R>.tar`` (the PNGs made by the progressive-GAN dataset tool) into
    ``manual_dir``; only its "train" split exists.

    Images are centre-cropped to a square, resized to ``resolution`` (Lanczos,
    antialiased), converted to RGB (grayscale repeated, alpha composited on white, 16-bit
    scaled) exactly like the image-folder source. Encoded images are shuffled before
    decoding, so the buffer costs little memory. The order is deterministic in ``seed``.

    Args:
      name: TFDS builder name, optionally with config and version ("celeb_a_hq/256").
      split: split spec, e.g. "train" or "train[:90%]".
      data_dir: where prepared TFDS datasets live (and are written).
      manual_dir: folder of manually obtained source files, for preparing.
      resolution: output height and width.
      image_key: the feature holding the image.
      label_key: optional feature returned as ``label``.
      batch_size: examples per batch.
      seed: seeds the file and example shuffles.
      shuffle: whether to shuffle.
      repeat: iterate forever (reshuffling every epoch) instead of once.
      drop_remainder: drop the last, smaller batch.
      shuffle_buffer: examples in the shuffle buffer.

    Returns:
      An iterator (set up eagerly, so errors raise at the call) of dicts: image float32
      [B, resolution, resolution, 3] in [-1, 1] and, with ``label_key``, label [B] (int32
      for integer labels).

    Raises:
      ImportError: tensorflow / tensorflow_datasets are not installed.
      KeyError: ``image_key`` or ``label_key`` is not a feature of the dataset.
    """
    tf, tfds = _import_tfds()
    builder = _prepare(tfds, name, data_dir, manual_dir)
    features = builder.info.features
    for key in (image_key, label_key):
        if key is not None and key not in features:
            raise KeyError(f"{name!r} has no feature {key!r}; features: {sorted(features.keys())}")
    image_feature = features[image_key]
    channels = image_feature.shape[-1]

    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(shuffle_seed=seed, options=options)
    ds = builder.as_dataset(
        split=split,
        shuffle_files=shuffle,
        read_config=read_config,
        decoders={image_key: tfds.decode.SkipDecoding()},
    )
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def prepare(example):
        image = image_feature.decode_example(example[image_key])  # [H, W, C]
        image = _center_square(tf, _to_rgb_float(tf, image, channels), resolution)
        out = {"image": image * 2.0 - 1.0}  # [R, R, 3] in [-1, 1]
        if label_key is not None:
            label = example[label_key]
            out["label"] = tf.cast(label, tf.int32) if label.dtype.is_integer else label
        return out

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    return iter(tfds.as_numpy(ds))


def example_views(data, resolution: int, wanted=None) -> dict:
    """A TFDS image dataset as identities: every example is one identity with one view.

    That is how HyperDreamBooth reads CelebA-HQ (15K images, each its own identity). Examples
    are read in file order (no shuffle), so identity ``i`` is always example ``i``; the first
    ``data.count`` examples are decoded into memory (``count x resolution^2 x 3`` bytes).

    Args:
      data: a config section with ``tfds_name``, ``split``, ``data_dir``, ``manual_dir``,
        ``count`` (and optionally ``image_key``).
      resolution: image side.
      wanted: keep only these identities (example indices).

    Returns:
      ``{example index: uint8 views [1, resolution, resolution, 3]}``, what
      :class:`hdb_jax.data.identities.ArrayIdentities` holds.
    """
    from hdb_jax.common.images import to_uint8

    count = int(data["count"])
    batches = tfds_images(
        data["tfds_name"],
        data["split"],
        data_dir=data["data_dir"],
        manual_dir=data.get("manual_dir") or None,
        resolution=resolution,
        image_key=data.get("image_key", "image") or "image",
        batch_size=min(64, count),
        seed=0,
        shuffle=False,
        drop_remainder=False,
    )
    images = []
    for batch in batches:
        images.extend(to_uint8(batch["image"]))
        if len(images) >= count:
            break
    keep = range(len(images[:count])) if wanted is None else [int(i) for i in wanted]
    return {i: images[i][None] for i in keep}
