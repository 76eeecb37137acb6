package embedfleet

import (
	"encoding/hex"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const testdata = "../../schemas/testdata"

func readJSON(t *testing.T, name string, into any) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(testdata, name))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, into); err != nil {
		t.Fatal(err)
	}
}

func TestContentHashVectors(t *testing.T) {
	var file struct {
		Vectors []struct {
			Name             string  `json:"name"`
			Text             string  `json:"text"`
			ModelFingerprint string  `json:"model_fingerprint"`
			Task             *string `json:"task"`
			Dimensions       *int    `json:"dimensions"`
			NFCTextUTF8Hex   string  `json:"nfc_text_utf8_hex"`
			PayloadHex       string  `json:"payload_hex"`
			Key              string  `json:"key"`
		} `json:"vectors"`
	}
	readJSON(t, "content_hash.json", &file)
	if len(file.Vectors) < 20 {
		t.Fatalf("only %d vectors", len(file.Vectors))
	}
	for _, v := range file.Vectors {
		task, dims := "", 0
		if v.Task != nil {
			task = *v.Task
		}
		if v.Dimensions != nil {
			dims = *v.Dimensions
		}
		payload, err := ContentHashPayload(v.Text, v.ModelFingerprint, task, dims)
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		if got := hex.EncodeToString(payload); got != v.PayloadHex {
			t.Errorf("%s: payload\n got %s\nwant %s", v.Name, got, v.PayloadHex)
		}
		if !containsHex(payload, v.NFCTextUTF8Hex) {
			t.Errorf("%s: payload does not end with the NFC text", v.Name)
		}
		key, err := ContentHash(v.Text, v.ModelFingerprint, task, dims)
		if err != nil || key != v.Key {
			t.Errorf("%s: key %s (%v), want %s", v.Name, key, err, v.Key)
		}
	}
}

// TestContentHashLongVectors checks every long_vectors entry (issue 24: the long spec appended
// as one more field) and that LongSpec writes the specs they use.
func TestContentHashLongVectors(t *testing.T) {
	var file struct {
		LongVectors []struct {
			Name             string  `json:"name"`
			Text             string  `json:"text"`
			ModelFingerprint string  `json:"model_fingerprint"`
			Task             *string `json:"task"`
			Dimensions       *int    `json:"dimensions"`
			LongSpec         string  `json:"long_spec"`
			PayloadHex       string  `json:"payload_hex"`
			Key              string  `json:"key"`
		} `json:"long_vectors"`
	}
	readJSON(t, "content_hash.json", &file)
	if len(file.LongVectors) < 3 {
		t.Fatalf("only %d long vectors", len(file.LongVectors))
	}
	for _, v := range file.LongVectors {
		task, dims := "", 0
		if v.Task != nil {
			task = *v.Task
		}
		if v.Dimensions != nil {
			dims = *v.Dimensions
		}
		if v.LongSpec == "" {
			t.Fatalf("%s: no long_spec", v.Name)
		}
		payload, err := ContentHashPayloadLong(v.Text, v.ModelFingerprint, task, dims, v.LongSpec)
		if err != nil {
			t.Fatalf("%s: %v", v.Name, err)
		}
		if got := hex.EncodeToString(payload); got != v.PayloadHex {
			t.Errorf("%s: payload\n got %s\nwant %s", v.Name, got, v.PayloadHex)
		}
		key, err := ContentHashLong(v.Text, v.ModelFingerprint, task, dims, v.LongSpec)
		if err != nil || key != v.Key {
			t.Errorf("%s: key %s (%v), want %s", v.Name, key, err, v.Key)
		}
		plain, _ := ContentHash(v.Text, v.ModelFingerprint, task, dims)
		if plain == key {
			t.Errorf("%s: the long spec does not change the key", v.Name)
		}
		// The spec is what LongSpec writes for its mode and overlap.
		mode, overlap, _ := strings.Cut(v.LongSpec, ":")
		n, err := strconv.Atoi(overlap)
		if err != nil {
			t.Fatalf("%s: long_spec %q", v.Name, v.LongSpec)
		}
		if spec, err := LongSpec(LongMode(mode), &n); err != nil || spec != v.LongSpec {
			t.Errorf("%s: LongSpec(%s, %d) = %q (%v)", v.Name, mode, n, spec, err)
		}
	}
}

func TestLongSpec(t *testing.T) {
	for _, c := range []struct {
		mode    LongMode
		overlap *int
		want    string
	}{
		{"", nil, ""}, {LongTruncate, nil, ""}, {LongTruncate, new(64), ""},
		{LongPool, nil, "pool:32"}, {LongPool, new(0), "pool:0"}, {LongChunks, new(256), "chunks:256"},
	} {
		if got, err := LongSpec(c.mode, c.overlap); err != nil || got != c.want {
			t.Errorf("LongSpec(%q, %v) = %q (%v), want %q", c.mode, c.overlap, got, err, c.want)
		}
	}
	for _, c := range []struct {
		mode    LongMode
		overlap *int
	}{{"Pool", nil}, {"sliding", nil}, {LongPool, new(-1)}, {LongChunks, new(WindowOverlapMax + 1)}} {
		if got, err := LongSpec(c.mode, c.overlap); err == nil {
			t.Errorf("LongSpec(%q, %v) = %q, want an error", c.mode, c.overlap, got)
		}
	}
	// A truncate spec ("") is the key of version 1; a non-ASCII spec has no field.
	plain, _ := ContentHash("x", "fp", "", 0)
	if key, err := ContentHashLong("x", "fp", "", 0, ""); err != nil || key != plain {
		t.Errorf("ContentHashLong with no spec = %s (%v), want %s", key, err, plain)
	}
	if _, err := ContentHashLong("x", "fp", "", 0, "pööl:32"); err == nil {
		t.Error("a non-ASCII long spec must be rejected")
	}
}

func containsHex(payload []byte, suffixHex string) bool {
	suffix, err := hex.DecodeString(suffixHex)
	return err == nil && len(payload) >= len(suffix) &&
		string(payload[len(payload)-len(suffix):]) == string(suffix)
}

func TestContentHashRejectsInvalidUTF8(t *testing.T) {
	if _, err := ContentHash("\xed\xa0\x80", "m", "", 0); err == nil {
		t.Error("a lone surrogate (as WTF-8) must be rejected")
	}
	if _, err := ContentHash("x", "m", "", -1); err == nil {
		t.Error("negative dimensions must be rejected")
	}
}

type codecFile struct {
	Vectors []struct {
		Name      string    `json:"name"`
		Vector    []float64 `json:"vector"`
		VectorB64 string    `json:"vector_b64"`
	} `json:"vectors"`
	Results []struct {
		Name string `json:"name"`
		JSON string `json:"json"`
	} `json:"results"`
}

func TestVectorBase64Vectors(t *testing.T) {
	var file codecFile
	readJSON(t, "codec.json", &file)
	for _, v := range file.Vectors {
		want := make([]float32, len(v.Vector))
		for i, f := range v.Vector {
			want[i] = float32(f)
			if float64(want[i]) != f {
				t.Fatalf("%s: %v is not a float32 value", v.Name, f)
			}
		}
		if got := EncodeVectorBase64(want); got != v.VectorB64 {
			t.Errorf("%s: encoded %s, want %s", v.Name, got, v.VectorB64)
		}
		got, err := DecodeVectorBase64(v.VectorB64)
		if err != nil || len(got) != len(want) {
			t.Fatalf("%s: %v (%d values)", v.Name, err, len(got))
		}
		for i := range got {
			if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
				t.Errorf("%s[%d]: %v, want %v", v.Name, i, got[i], want[i])
			}
		}
	}
}

func TestResultVectorsAgree(t *testing.T) {
	var file codecFile
	readJSON(t, "codec.json", &file)
	var floats, encoded []float32
	for _, r := range file.Results {
		var result struct {
			Vector    []float64 `json:"vector"`
			VectorB64 *string   `json:"vector_b64"`
		}
		if err := json.Unmarshal([]byte(r.JSON), &result); err != nil {
			t.Fatalf("%s: %v", r.Name, err)
		}
		switch {
		case result.Vector != nil:
			for _, f := range result.Vector {
				floats = append(floats, float32(f))
			}
		case result.VectorB64 != nil:
			decoded, err := DecodeVectorBase64(*result.VectorB64)
			if err != nil {
				t.Fatalf("%s: %v", r.Name, err)
			}
			encoded = append(encoded, decoded...)
		}
	}
	if len(floats) == 0 || len(floats) != len(encoded) {
		t.Fatalf("float and base64 results differ in length: %d vs %d", len(floats), len(encoded))
	}
	for i := range floats {
		if floats[i] != encoded[i] {
			t.Errorf("[%d]: %v vs %v", i, floats[i], encoded[i])
		}
	}
}

func TestDecodeVectorBase64RejectsBadInput(t *testing.T) {
	for _, bad := range []string{"not base64!", "AAA", "AAAAAAA="} {
		if _, err := DecodeVectorBase64(bad); err == nil {
			t.Errorf("%q decoded", bad)
		}
	}
}

// The cache layout, the contract record and the limits come from schemas/ (cache_layout.json),
// which the Python worker and client are tested against too.
func TestCacheLayoutVectors(t *testing.T) {
	var file struct {
		Keys []struct {
			Prefix      string `json:"prefix"`
			Model       string `json:"model"`
			Dim         int    `json:"dim"`
			ContentHash string `json:"content_hash"`
			VectorKey   string `json:"vector_key"`
			ContractKey string `json:"contract_key"`
		} `json:"keys"`
		Contract struct {
			Fields map[string]string `json:"fields"`
		} `json:"contract"`
		Limits struct {
			MaxTextBytes int `json:"max_text_bytes"`
		} `json:"limits"`
	}
	readJSON(t, "cache_layout.json", &file)
	if len(file.Keys) < 3 {
		t.Fatalf("only %d key cases", len(file.Keys))
	}
	for _, k := range file.Keys {
		if got := VectorKey(k.Prefix, k.Model, k.Dim, k.ContentHash); got != k.VectorKey {
			t.Errorf("VectorKey(%q, %q, %d) = %q, want %q", k.Prefix, k.Model, k.Dim, got, k.VectorKey)
		}
		if got := ContractKey(k.Prefix, k.Model); got != k.ContractKey {
			t.Errorf("ContractKey(%q, %q) = %q, want %q", k.Prefix, k.Model, got, k.ContractKey)
		}
	}
	contract, ok := ParseModelContract(file.Contract.Fields)
	if !ok || contract.Dim != 384 || contract.MaxTokens != 256 || len(contract.Tasks) != 2 || len(contract.Dimensions) != 2 {
		t.Errorf("contract %+v ok=%v", contract, ok)
	}
	if MaxTextBytes != file.Limits.MaxTextBytes {
		t.Errorf("MaxTextBytes = %d, the workers' limit is %d", MaxTextBytes, file.Limits.MaxTextBytes)
	}
}
