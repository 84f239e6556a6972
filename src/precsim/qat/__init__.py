"""Where and when rounding happens in a model: config, observers, the Quantizer, prepare,
markers, graph tracing, BN folding, bias, the quantized optimizer and calibration."""
