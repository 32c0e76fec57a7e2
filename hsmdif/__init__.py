"""What hsmdifctl and hsmdifd share without either importing the other's internals."""
