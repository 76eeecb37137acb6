package embedfleet

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// MaxTextBytes is the workers' default limit on a text (UTF-8 bytes).
const MaxTextBytes = 64 << 10

// PartitionKey is the request key when no model fingerprint is known (no Redis and no
// Config.ModelFingerprint): SHA-256 hex of the NFC text. It only keeps identical texts on
// one partition; it is not a content hash, so the cache is not read.
func PartitionKey(text string) string {
	sum := sha256.Sum256([]byte(norm.NFC.String(text)))
	return hex.EncodeToString(sum[:])
}

// localProblem reports a text that every worker would reject, so it costs no round trip.
func localProblem(text string) (code, message string, bad bool) {
	switch {
	case !utf8.ValidString(text):
		return "invalid_encoding", "text is not valid UTF-8", true
	case strings.TrimSpace(text) == "":
		return "empty_text", "text is empty or only whitespace", true
	case len(text) > MaxTextBytes:
		return "text_too_long", fmt.Sprintf("text is %d UTF-8 bytes; the limit is %d", len(text), MaxTextBytes), true
	}
	return "", "", false
}

// distinctText is one distinct text of a call: one request serves every index it appears at.
type distinctText struct {
	key     string
	text    string
	indices []int
}

type plan struct {
	distinct      []*distinctText
	failures      []TextError
	byContentHash bool // keys are content hashes: the cache can be read
}

// planRequests keys each text (ContentHashLong with longSpec when the fingerprint is known, else
// PartitionKey) and merges repeated ones.
func planRequests(texts []string, fingerprint, task string, dimensions int, longSpec string) (plan, error) {
	p := plan{byContentHash: fingerprint != ""}
	byKey := make(map[string]*distinctText, len(texts))
	for i, text := range texts {
		if code, message, bad := localProblem(text); bad {
			p.failures = append(p.failures, TextError{Index: i, Code: code, Message: message})
			continue
		}
		key := PartitionKey(text)
		if fingerprint != "" {
			var err error
			if key, err = ContentHashLong(text, fingerprint, task, dimensions, longSpec); err != nil {
				return p, err
			}
		}
		entry, seen := byKey[key]
		if !seen {
			entry = &distinctText{key: key, text: text}
			byKey[key] = entry
			p.distinct = append(p.distinct, entry)
		}
		entry.indices = append(entry.indices, i)
	}
	return p, nil
}
