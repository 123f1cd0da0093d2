// Package restsink is podevents.Sink over a REST client that knows core/v1 Events only (create and
// merge-patch of raw JSON): the broker links no typed clientset and no scheme of API types for it.
//
// It may import the standard library, csi/podevents and client-go's rest (with apimachinery).
package restsink
