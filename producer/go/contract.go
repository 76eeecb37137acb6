// Package embedfleet holds the parts of the embedfleet wire contract that a Go
// producer needs to match the Python workers byte for byte: the content hash (the
// Kafka key of requests and results) and the base64 float32 vector encoding.
//
// The specification is schemas/content_hash.py's docstring; the test vectors in
// schemas/testdata/ are the contract.
package embedfleet

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"strconv"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// ContentHashTag is the fixed prefix of the hashed payload (version 1 of the encoding).
const ContentHashTag = "embedfleet-content-v1"

// SchemaVersion is the value of the `schema` Kafka header (LongInputsSchemaVersion for a
// request whose long is pool or chunks).
const SchemaVersion = "1"

func appendField(payload []byte, field string) []byte {
	payload = binary.BigEndian.AppendUint64(payload, uint64(len(field)))
	return append(payload, field...)
}

// ContentHashPayload returns the exact bytes that ContentHash feeds to SHA-256.
// task == "" means no task; dimensions == 0 means none (dimensions must be >= 0).
func ContentHashPayload(text, modelFingerprint, task string, dimensions int) ([]byte, error) {
	return ContentHashPayloadLong(text, modelFingerprint, task, dimensions, "")
}

// ContentHashPayloadLong is ContentHashPayload with the long spec of a long-input request
// appended as one more field (LongSpec: "pool:32", "chunks:0"); longSpec == "" (truncate)
// appends nothing, so the payload is ContentHashPayload's.
func ContentHashPayloadLong(text, modelFingerprint, task string, dimensions int, longSpec string) ([]byte, error) {
	for name, value := range map[string]string{
		"text": text, "model_fingerprint": modelFingerprint, "task": task,
	} {
		if !utf8.ValidString(value) {
			return nil, fmt.Errorf("embedfleet: %s is not valid UTF-8", name)
		}
	}
	for i := 0; i < len(longSpec); i++ {
		if longSpec[i] >= utf8.RuneSelf {
			return nil, fmt.Errorf("embedfleet: long spec %q is not ASCII", longSpec)
		}
	}
	if dimensions < 0 {
		return nil, fmt.Errorf("embedfleet: dimensions must be positive, got %d", dimensions)
	}
	dims := ""
	if dimensions > 0 {
		dims = strconv.Itoa(dimensions)
	}
	nfc := norm.NFC.String(text)
	payload := make([]byte, 0, len(ContentHashTag)+5*8+len(modelFingerprint)+len(task)+len(dims)+len(nfc)+len(longSpec))
	payload = append(payload, ContentHashTag...)
	payload = appendField(payload, modelFingerprint)
	payload = appendField(payload, task)
	payload = appendField(payload, dims)
	payload = appendField(payload, nfc)
	if longSpec != "" {
		payload = appendField(payload, longSpec)
	}
	return payload, nil
}

// ContentHash is the lowercase SHA-256 hex of ContentHashPayload.
func ContentHash(text, modelFingerprint, task string, dimensions int) (string, error) {
	return ContentHashLong(text, modelFingerprint, task, dimensions, "")
}

// ContentHashLong is the lowercase SHA-256 hex of ContentHashPayloadLong: the key of a request
// with long inputs (longSpec from LongSpec; "" for truncate, the key of ContentHash).
func ContentHashLong(text, modelFingerprint, task string, dimensions int, longSpec string) (string, error) {
	payload, err := ContentHashPayloadLong(text, modelFingerprint, task, dimensions, longSpec)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(payload)
	return hex.EncodeToString(sum[:]), nil
}

// LongMode says what a worker does with a text longer than the model reads (issue 24).
type LongMode string

const (
	// LongTruncate cuts the text at the model's limit: the default (omitted on the wire).
	LongTruncate LongMode = "truncate"
	// LongPool embeds overlapping windows of the text and returns their token-weighted mean,
	// re-normalised.
	LongPool LongMode = "pool"
	// LongChunks returns that mean and every window's vector with its span of the text.
	LongChunks LongMode = "chunks"
)

const (
	// LongInputsSchemaVersion is the `schema` header of a request whose long is pool or
	// chunks: a worker built before long inputs refuses it instead of truncating silently.
	LongInputsSchemaVersion = "2"
	// DefaultWindowOverlap is the overlap (tokens shared by consecutive windows) the workers
	// use when a pool or chunks request sets none.
	DefaultWindowOverlap = 32
	// WindowOverlapMax is the largest overlap a request may set (the worker also bounds it
	// by a quarter of the model's window).
	WindowOverlapMax = 256
)

// Windowed says whether the mode splits a long text into windows (pool or chunks).
func (m LongMode) Windowed() bool { return m == LongPool || m == LongChunks }

// LongSpec is what the content hash appends for a long-input request (ContentHashLong):
// "<mode>:<overlap>" with the default overlap written out ("pool:32"), or "" for truncate
// (and the empty mode), whose keys are those of a request without the option. overlap nil
// means the default. An unknown mode or an overlap outside 0..WindowOverlapMax is an error.
func LongSpec(mode LongMode, overlap *int) (string, error) {
	if err := checkLong(mode, overlap); err != nil {
		return "", err
	}
	if !mode.Windowed() {
		return "", nil
	}
	n := DefaultWindowOverlap
	if overlap != nil {
		n = *overlap
	}
	return string(mode) + ":" + strconv.Itoa(n), nil
}

func checkLong(mode LongMode, overlap *int) error {
	switch mode {
	case "", LongTruncate, LongPool, LongChunks:
	default:
		return fmt.Errorf("embedfleet: long must be truncate, pool or chunks, got %q", string(mode))
	}
	if overlap != nil && (*overlap < 0 || *overlap > WindowOverlapMax) {
		return fmt.Errorf("embedfleet: overlap must be 0 to %d tokens, got %d", WindowOverlapMax, *overlap)
	}
	return nil
}

// DecodeVectorBase64 decodes a result's vector_b64: standard base64 of
// little-endian float32 values.
func DecodeVectorBase64(encoded string) ([]float32, error) {
	raw, err := base64.StdEncoding.Strict().DecodeString(encoded)
	if err != nil {
		return nil, fmt.Errorf("embedfleet: vector_b64: %w", err)
	}
	if len(raw)%4 != 0 {
		return nil, errors.New("embedfleet: vector_b64 is not a whole number of float32 values")
	}
	vector := make([]float32, len(raw)/4)
	for i := range vector {
		vector[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return vector, nil
}

// EncodeVectorBase64 is the inverse of DecodeVectorBase64.
func EncodeVectorBase64(vector []float32) string {
	raw := make([]byte, 4*len(vector))
	for i, value := range vector {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(value))
	}
	return base64.StdEncoding.EncodeToString(raw)
}
