"""The API's resources: one flask-smorest blueprint each."""
