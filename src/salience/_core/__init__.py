"""The machinery no user calls, at the bottom of the house: it imports nothing else of salience.

``autograd`` (the one place that calls ``torch.autograd``), ``engine`` (items in chunks, running
sums, memory budget, several targets from one forward), ``guard`` (the model restored),
``layers`` (names -> modules), ``info`` (a model's preprocessing and class names), ``files``
(atomic writes), ``progress``, ``errors`` and ``tensors`` (the one blur, scaler, device and
argument-check helpers).
"""
