"""Inference: ``batch`` (a model on prepared images, with test-time augmentation), ``backends``
(torch checkpoint and onnxruntime behind one interface), ``inputs`` (files, folders, patterns;
preprocessing), ``postprocess`` (scores, decisions, region boxes), ``predict`` (the
``cxrloc predict`` driver and its outputs), ``overlay`` (Figure-1 pictures) and ``export`` (ONNX)."""
