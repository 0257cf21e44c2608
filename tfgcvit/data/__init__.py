"""Images in, labels out: image files to model inputs (`images`), `preprocess_input` and
`decode_predictions` (`preprocessing`), and the ImageNet class names."""
