"""digitserve training: MNIST data, the BatchNorm + Dropout nets, training and evaluation."""
