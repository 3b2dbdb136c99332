"""Media math and files shared by the model and the data layers: mel/fbank features, PNG/WAV reading and writing."""
