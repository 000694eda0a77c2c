"""rclpy glue: image codec, parameters, diagnostics, the segmentation node and the SynthWorld camera."""
