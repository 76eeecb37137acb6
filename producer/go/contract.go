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

// SchemaVersion is the value of the `schema` Kafka header.
const SchemaVersion = "1"

func appendField(payload []byte, field string) []byte {
	payload = binary.BigEndian.AppendUint64(payload, uint64(len(field)))
	return append(payload, field...)
}

// ContentHashPayload returns the exact bytes that ContentHash feeds to SHA-256.
// task == "" means no task; dimensions == 0 means none (dimensions must be >= 0).
func ContentHashPayload(text, modelFingerprint, task string, dimensions int) ([]byte, error) {
	for name, value := range map[string]string{
		"text": text, "model_fingerprint": modelFingerprint, "task": task,
	} {
		if !utf8.ValidString(value) {
			return nil, fmt.Errorf("embedfleet: %s is not valid UTF-8", name)
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
	payload := make([]byte, 0, len(ContentHashTag)+4*8+len(modelFingerprint)+len(task)+len(dims)+len(nfc))
	payload = append(payload, ContentHashTag...)
	payload = appendField(payload, modelFingerprint)
	payload = appendField(payload, task)
	payload = appendField(payload, dims)
	payload = appendField(payload, nfc)
	return payload, nil
}

// ContentHash is the lowercase SHA-256 hex of ContentHashPayload.
func ContentHash(text, modelFingerprint, task string, dimensions int) (string, error) {
	payload, err := ContentHashPayload(text, modelFingerprint, task, dimensions)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(payload)
	return hex.EncodeToString(sum[:]), nil
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
