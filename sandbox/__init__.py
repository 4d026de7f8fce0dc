"""APSIS One sandbox: a simulator of the single profile export API that misbehaves on demand."""
