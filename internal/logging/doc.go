// Package logging builds the zap loggers of Keyward's binaries: JSON, ISO-8601 times, a level from a
// flag. Loggers are passed into constructors; nothing uses zap's globals.
//
// It may import the standard library and zap.
package logging
